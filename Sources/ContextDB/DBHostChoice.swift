/// What a `chooseHost` hook is asked: which connect needs a session, for which request.
public struct DBHostRequest<Engine: DatabaseEngine>: Sendable {
    /// The connect whose session is about to be created.
    public let connect: DBConnect<Engine>
    /// The read-your-own-writes position of the context the session is made for
    /// (``DBContext/consistencyToken``), or `nil`: a replica chosen for the session should have
    /// replayed up to it.
    public let consistencyToken: String?
    /// What the code creating the session asks of replica reads (``withPrimaryReads(isolation:_:)``,
    /// ``withMaxStaleness(_:isolation:_:)``).
    public let readPreference: DBReadPreference

    /// Creates a request.
    /// - Parameters:
    ///   - connect: The connect whose session is about to be created.
    ///   - consistencyToken: The context's read-your-own-writes position, if any.
    ///   - readPreference: The scope's read preference. Default: the current task's.
    public init(connect: DBConnect<Engine>, consistencyToken: String?, readPreference: DBReadPreference = .current) {
        self.connect = connect
        self.consistencyToken = consistencyToken
        self.readPreference = readPreference
    }
}

/// The host a `chooseHost` hook picked for one session, and where the session goes if that
/// host cannot serve.
///
/// ```swift
/// let replica = DBConnect(label: "replica", chooseHost: { _ in
///     DBHostChoice("db2:5432", fallbacks: ["db3:5432", "db1:5432"])
/// }) { host in try makeEngine(host) }
/// ```
public struct DBHostChoice: Sendable {
    /// The host the session binds to.
    public var host: String
    /// Hosts the session tries, in order, when its first lease on `host` fails (before it ever
    /// had a connection).
    public var fallbacks: [String]
    /// Told about each host whose lease failed, with the error (to mark it suspect, say).
    public var onLeaseFailure: (@Sendable (_ host: String, _ error: DBError) -> Void)?
    /// `host` is now the only host of the connect (a promoted primary): the connect takes the
    /// engines of its other hosts out and drains them — each shuts down once its sessions have
    /// given their connections back. Default `false`.
    public var retiresOtherHosts: Bool
    /// Hosts that left the cluster: the connect takes its engines for them out and drains them
    /// (each shuts down once its sessions have given their connections back). Default none.
    public var retiredHosts: [String]
    /// The role of `host` as the hook saw it (`primary`, `replica`), for traces: each of the
    /// session's transaction spans gets a `contextdb.routing` event with it. Default `nil`.
    public var role: String?
    /// Why the hook chose `host` (`policy`, `token_wait`, `token_primary`, `fallback_primary`, `scope`),
    /// for the same event. Default `nil`.
    public var reason: String?

    /// Creates a choice.
    /// - Parameters:
    ///   - host: The host, such as `"db1:5432"`; must not be empty.
    ///   - fallbacks: Hosts to try next, in order. Default none.
    ///   - retiresOtherHosts: Drain the engines of every other host. Default `false`.
    ///   - retiredHosts: Hosts that left the cluster, whose engines to drain. Default none.
    ///   - role: The host's role, for traces. Default `nil`.
    ///   - reason: Why the hook chose it, for traces. Default `nil`.
    ///   - onLeaseFailure: Told about each host whose lease failed.
    public init(
        _ host: String,
        fallbacks: [String] = [],
        retiresOtherHosts: Bool = false,
        retiredHosts: [String] = [],
        role: String? = nil,
        reason: String? = nil,
        onLeaseFailure: (@Sendable (_ host: String, _ error: DBError) -> Void)? = nil
    ) {
        self.host = host
        self.fallbacks = fallbacks
        self.retiresOtherHosts = retiresOtherHosts
        self.retiredHosts = retiredHosts
        self.role = role
        self.reason = reason
        self.onLeaseFailure = onLeaseFailure
    }
}
