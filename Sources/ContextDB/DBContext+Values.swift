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
        get { state.withLock { $0.consistencyToken } }
        set { state.withLock { $0.consistencyToken = newValue } }
    }

    /// Changes ``consistencyToken`` atomically, so concurrent commits in one request keep the
    /// newest position.
    /// - Parameter update: Given the current token, returns the new one.
    public func updateConsistencyToken(_ update: (String?) -> String?) {
        state.withLock { $0.consistencyToken = update($0.consistencyToken) }
    }
}

/// A key for a value stored in a ``DBContext`` (see ``DBContext/subscript(_:)``).
public protocol DBContextKey {
    /// The type of the stored value.
    associatedtype Value: Sendable
}
