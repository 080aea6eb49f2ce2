/// A database driver as ContextDB sees it: a pool that leases connections and runs
/// transaction control statements on them.
///
/// An engine is created lazily by a ``DBConnect``, one per host, and shut down by
/// ``DBConnect/close()``. Implementations must be safe to call from many tasks at once.
public protocol DatabaseEngine: Sendable {
    /// One leased connection. Handed to one session at a time.
    associatedtype Connection: Sendable

    /// Leases a connection from the pool, connecting if needed.
    /// - Throws: A ``DBError`` with code ``DBError/Code/connectionFailed`` when no connection can be had.
    func leaseConnection() async throws -> Connection

    /// Gives a leased connection back.
    ///
    /// ContextDB only releases a connection that is outside any transaction; when it could not
    /// make sure of that, it passes `reusable: false` and the engine must close the connection
    /// instead of pooling it.
    /// - Parameters:
    ///   - connection: A connection this engine leased.
    ///   - reusable: `false` when the connection must not be handed to another borrower.
    func releaseConnection(_ connection: Connection, reusable: Bool) async

    /// Runs a transaction control statement (`BEGIN`, `COMMIT`, `ROLLBACK`, savepoints).
    ///
    /// - Parameters:
    ///   - statement: The statement to run.
    ///   - connection: A leased connection.
    /// - Throws: For ``DBControlStatement/commit``, a ``DBError`` with code
    ///   ``DBError/Code/commitFailed`` when the server ended the transaction without committing
    ///   it (PostgreSQL answers `COMMIT` of an aborted transaction with the tag `ROLLBACK`): the
    ///   session then knows the transaction is over. For `COMMIT`, a ``DBError`` with code
    ///   ``DBError/Code/commitOutcomeUnknown`` when it was sent and its answer was lost. A
    ///   ``DBError`` with code ``DBError/Code/connectionLost`` when the server closed the
    ///   connection (the session then discards it, and retries a failed `BEGIN` on a new
    ///   connection: nothing ran in it). Any other error for a statement that failed.
    func execute(_ statement: DBControlStatement, on connection: Connection) async throws

    /// Whether a leased connection can still run statements: `false` once the server closed it
    /// or the engine gave up on it (a statement past its deadline, say). After a failure the
    /// session asks this, not the error, to decide whether the connection and its open
    /// transaction are lost (a ``DBError/Code/connectionLost`` error counts as lost too). The
    /// default (in an extension) answers `true`.
    /// - Parameter connection: A connection this engine leased.
    func isConnectionUsable(_ connection: Connection) -> Bool

    /// Closes every connection and stops the pool. Called once; leases still out fail afterwards.
    func shutdown() async
}

/// A transaction control statement a session asks its engine to run. The engine writes it in
/// its own dialect (`ContextDBPostgres` as PostgreSQL's `BEGIN … ISOLATION LEVEL … READ ONLY`).
public enum DBControlStatement: Sendable, Hashable {
    /// Opens a transaction with the session's options.
    case begin(DBSessionOptions)
    /// Commits the open transaction.
    case commit
    /// Rolls the open transaction back.
    case rollback
    /// Sets a savepoint with the given name.
    case savepoint(String)
    /// Releases (keeps the work of) a savepoint.
    case releaseSavepoint(String)
    /// Undoes the work since a savepoint, keeping the transaction open.
    case rollbackToSavepoint(String)
}

/// How a ``DBConnect``'s sessions open their transactions.
public struct DBSessionOptions: Sendable, Hashable {
    /// Open every transaction `READ ONLY`: a write fails at once. Default `false`.
    public var readOnly: Bool
    /// The isolation level of every transaction; `nil` (the default) keeps the server's default.
    public var isolationLevel: DBIsolationLevel?

    /// Creates session options.
    /// - Parameters:
    ///   - readOnly: Open transactions `READ ONLY`. Default `false`.
    ///   - isolationLevel: The isolation level; `nil` keeps the server's default.
    public init(readOnly: Bool = false, isolationLevel: DBIsolationLevel? = nil) {
        self.readOnly = readOnly
        self.isolationLevel = isolationLevel
    }
}

/// A SQL transaction isolation level.
public enum DBIsolationLevel: String, Sendable, Hashable, CaseIterable {
    /// `READ UNCOMMITTED` (PostgreSQL treats it as read committed).
    case readUncommitted
    /// `READ COMMITTED`, PostgreSQL's default.
    case readCommitted
    /// `REPEATABLE READ`.
    case repeatableRead
    /// `SERIALIZABLE`.
    case serializable

}

extension DatabaseEngine {
    /// Answers `true`: an engine that cannot tell a dead connection keeps the session's.
    public func isConnectionUsable(_ connection: Connection) -> Bool { true }
}
