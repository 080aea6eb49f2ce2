/// The one error type ContextDB throws.
///
/// Match on ``code``; read ``description`` for what went wrong and what to do.
/// The description names the connect and the host, never a password, SQL text or bound values.
public struct DBError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Open to growth: match with `==`, keep a `default` case.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Base: String, Sendable {
            case noContext
            case contextAlreadyActive
            case contextFinished
            case emptyHost
            case hostNotSet
            case transactionAlreadyOpen
            case sessionBusy
            case sessionClosed
            case engineCreationFailed
            case connectionFailed
            case commitFailed
            case readOnlySession
            case invalidConfiguration
            case queryFailed
            case noHostAvailable
            case connectionLost
            case statementTimeout
            case commitOutcomeUnknown
            case notRunning
            case writesPrevented
        }

        let base: Base

        /// A session was asked for outside any request context.
        public static let noContext = Code(base: .noContext)
        /// A context was required to be the outermost one, but another is active.
        public static let contextAlreadyActive = Code(base: .contextAlreadyActive)
        /// The request context already ended; its sessions are closed.
        public static let contextFinished = Code(base: .contextFinished)
        /// An empty host name was given to `connect(host:)`, `changeHost(_:)` or a configuration.
        public static let emptyHost = Code(base: .emptyHost)
        /// A session was needed but no host is set and the host hook chose none.
        public static let hostNotSet = Code(base: .hostNotSet)
        /// `atomic(.fail)` found a transaction already open.
        public static let transactionAlreadyOpen = Code(base: .transactionAlreadyOpen)
        /// A session was used by two tasks at once.
        public static let sessionBusy = Code(base: .sessionBusy)
        /// A closed session was used again.
        public static let sessionClosed = Code(base: .sessionClosed)
        /// The engine factory for a host threw.
        public static let engineCreationFailed = Code(base: .engineCreationFailed)
        /// A connection to a host could not be leased.
        public static let connectionFailed = Code(base: .connectionFailed)
        /// `COMMIT` failed; nothing of that transaction was committed.
        public static let commitFailed = Code(base: .commitFailed)
        /// A write was attempted in a read-only session.
        public static let readOnlySession = Code(base: .readOnlySession)
        /// A configuration (a URI, an option) could not be used.
        public static let invalidConfiguration = Code(base: .invalidConfiguration)
        /// A statement failed on the server.
        public static let queryFailed = Code(base: .queryFailed)
        /// Routing found no host fit to serve the session (no healthy primary, no fit replica).
        public static let noHostAvailable = Code(base: .noHostAvailable)
        /// The server closed the session's connection (terminated, timed out, crashed or
        /// restarted). The connection is discarded, never pooled; the work of its open
        /// transaction is gone, and the session refuses statements until it is rolled back.
        public static let connectionLost = Code(base: .connectionLost)
        /// A statement ran longer than the connect's client-side statement timeout. It was
        /// cancelled; when the server answered neither the statement nor the cancel, the
        /// connection was closed as well (the session then treats the transaction as lost).
        public static let statementTimeout = Code(base: .statementTimeout)
        /// `COMMIT` was sent, but the connection was lost before its answer arrived: the
        /// transaction may or may not have committed. Never retried; check before retrying.
        public static let commitOutcomeUnknown = Code(base: .commitOutcomeUnknown)
        /// An engine that needs its background work running was used while nothing ran it: run
        /// its ``DBConnect`` (a ServiceLifecycle `Service`), or the engine itself.
        public static let notRunning = Code(base: .notRunning)
        /// A write in a transaction of a connect whose writes are prevented (``DBConnect/preventsWrites``,
        /// ``DBConnect/writesPreventedEverywhere``): maintenance or a failover. Reads keep working.
        public static let writesPrevented = Code(base: .writesPrevented)

        public var description: String { base.rawValue }
    }

    /// What kind of failure this is.
    public var code: Code
    /// The label of the ``DBConnect`` involved, when there is one.
    public var connect: String?
    /// The host involved, when there is one (`host` or `host:port`, never credentials).
    public var host: String?
    /// A human-readable explanation with the fix. Never contains secrets.
    public var message: String
    /// The error that caused this one, if any.
    public var underlying: (any Error)?
    /// Whether the request this error ended had committed work before it — set by
    /// `withDBRequest` (and so the middlewares); `nil` outside a request. A request that
    /// committed nothing can be retried by its client as a whole (``httpAnswer(exposingDetails:)``).
    public var requestCommittedWork: Bool?

    /// Creates an error.
    /// - Parameters:
    ///   - code: The kind of failure.
    ///   - message: What went wrong and what to do, without secrets.
    ///   - connect: The label of the connect involved.
    ///   - host: The host involved.
    ///   - underlying: The cause.
    public init(
        _ code: Code,
        _ message: String,
        connect: String? = nil,
        host: String? = nil,
        underlying: (any Error)? = nil
    ) {
        self.code = code
        self.message = message
        self.connect = connect
        self.host = host
        self.underlying = underlying
    }

    public var description: String {
        var text = "DBError.\(code)"
        var scope: [String] = []
        if let connect { scope.append("connect \"\(connect)\"") }
        if let host { scope.append("host \(host)") }
        if !scope.isEmpty { text += " (\(scope.joined(separator: ", ")))" }
        text += ": \(message)"
        if let underlying { text += " [cause: \(Self.redactingSourcePaths(String(describing: underlying)))]" }
        return text
    }

    /// `text` without the source locations some libraries put in their errors' descriptions
    /// (BoringSSL's `… at /path/of/the/build/handshake.cc:393`): a build's paths mean nothing to
    /// the reader of an error and tell an attacker about the build.
    /// - Parameter text: An error's description.
    /// - Returns: `text` with each ` at /…:<line>` removed.
    public static func redactingSourcePaths(_ text: String) -> String {
        var result = ""
        var rest = Substring(text)
        while let marker = rest.firstRange(of: " at /") {
            // The path runs to the first character that cannot be in it here; then ":<digits>".
            let path = rest[marker.upperBound...].prefix { !" )]},;\"'\n".contains($0) }
            let line = path.lastIndex(of: ":").map { path[path.index(after: $0)...].prefix(while: \.isNumber) }
            guard let line, !line.isEmpty else {
                result += rest[..<marker.upperBound]
                rest = rest[marker.upperBound...]
                continue
            }
            result += rest[..<marker.lowerBound]
            rest = rest[line.endIndex...]
        }
        return result + rest
    }
}
