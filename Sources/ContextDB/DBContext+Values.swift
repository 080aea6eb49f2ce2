import Synchronization

/// Request-wide values: typed by key, and the read-your-own-writes token.
extension DBContext {
    /// A value stored in this context for the rest of the request, by key type.
    ///
    /// Use it to carry request-wide facts between the handler, `beforeCommit` and the
    /// middleware — a read-your-own-writes token, say:
    /// ```swift
    /// enum CommitLSN: DBContextKey { typealias Value = String }
    /// DBContext.current?[CommitLSN.self] = lsn
    /// ```
    public subscript<Key: DBContextKey>(_ key: Key.Type) -> Key.Value? {
        get { state.withLock { $0.values[ObjectIdentifier(key)] as? Key.Value } }
        set { state.withLock { $0.values[ObjectIdentifier(key)] = newValue } }
    }

    /// The position the request's reads must reflect — for PostgreSQL, the WAL LSN of the
    /// request's last committed write, or one the client echoed back (`X-WAL-LSN`).
    ///
    /// Engines that support read-your-own-writes advance it when a transaction that wrote
    /// commits; replica routing reads it; the middleware takes it from the request and returns
    /// it to the client. Opaque to the core.
    public var consistencyToken: String? {
        get { consistency.token }
        set { consistency.update { _ in newValue } }
    }

    /// A read-your-own-writes token as a client sent it back (a cookie or a header), or `nil`
    /// when it cannot be one: empty, longer than 64 characters, or with whitespace, `;` or a
    /// character outside ASCII. The engine validates the rest. The middlewares use it.
    /// - Parameter value: The cookie's or the header's value, if the request had one.
    /// - Returns: `value`, or `nil`.
    public static func consistencyToken(fromClient value: String?) -> String? {
        guard let value, !value.isEmpty, value.count <= 64, value.allSatisfy({ $0.isASCII && !$0.isWhitespace && $0 != ";" }) else {
            return nil
        }
        return value
    }

    /// Changes ``consistencyToken`` atomically, so concurrent commits in one request keep the
    /// newest position.
    /// - Parameter update: Given the current token, returns the new one.
    public func updateConsistencyToken(_ update: (String?) -> String?) {
        consistency.update(update)
    }
}

/// A context's read-your-own-writes position, shared with the sessions made for the context:
/// a session reports each commit's position here, never to whatever context is current.
final class DBConsistencyRecord: Sendable {
    private let value = Mutex<String?>(nil)
    private let commits = Atomic<Int>(0)
    /// The record of the context this one's is nested in: a commit here is one of it too.
    private let parent: DBConsistencyRecord?

    init(parent: DBConsistencyRecord? = nil) {
        self.parent = parent
    }

    /// Whether a session of the context, or of a context nested in it, committed a
    /// transaction (its work is saved).
    var hasCommitted: Bool { commits.load(ordering: .relaxed) > 0 }

    /// Records that a session of the context committed.
    func noteCommit() {
        commits.add(1, ordering: .relaxed)
        parent?.noteCommit()
    }

    var token: String? { value.withLock { $0 } }

    func update(_ change: (String?) -> String?) {
        value.withLock { $0 = change($0) }
    }

    /// Records a commit's position, keeping the later of it and the current one.
    func advance(to token: String, latest: (String?, String) -> String) {
        value.withLock { $0 = latest($0, token) }
    }
}

/// A key for a value stored in a ``DBContext`` (see ``DBContext/subscript(_:)``).
public protocol DBContextKey {
    /// The type of the stored value.
    associatedtype Value: Sendable
}
