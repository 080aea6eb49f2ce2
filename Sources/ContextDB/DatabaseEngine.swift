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
    /// - Returns: What the statement reported: for a `COMMIT` of a transaction that wrote, the
    ///   engine's read-your-own-writes position, when it tracks one; ``DBControlResult/empty``
    ///   otherwise. The session passes it to its context; the engine never writes it anywhere.
    /// - Throws: For ``DBControlStatement/commit``, a ``DBError`` with code
    ///   ``DBError/Code/commitFailed`` when the server ended the transaction without committing
    ///   it (PostgreSQL answers `COMMIT` of an aborted transaction with the tag `ROLLBACK`): the
    ///   session then knows the transaction is over. For `COMMIT`, a ``DBError`` with code
    ///   ``DBError/Code/commitOutcomeUnknown`` when it was sent and its answer was lost. A
    ///   ``DBError`` with code ``DBError/Code/connectionLost`` when the server closed the
    ///   connection (the session then discards it, and retries a failed `BEGIN` on a new
    ///   connection: nothing ran in it) — for `COMMIT`, only when `COMMIT` was never sent: the
    ///   session reports that the server rolled the transaction back (an HTTP 503, which a client
    ///   may retry). Any other error for a statement that failed.
    func execute(_ statement: DBControlStatement, on connection: Connection) async throws -> DBControlResult

    /// The later of two read-your-own-writes positions of this engine (see
    /// ``DBControlResult/consistencyToken``), so that concurrent commits in one request keep the
    /// newest. The default (in an extension) answers `new`.
    /// - Parameters:
    ///   - current: The context's position, if it has one.
    ///   - new: The position a commit just reported.
    /// - Returns: The position the context keeps.
    static func latestConsistencyToken(_ current: String?, _ new: String) -> String

    /// Whether a leased connection can still run statements: `false` once the server closed it
    /// or the engine gave up on it (a statement past its deadline, say). After a failure the
    /// session asks this, not the error, to decide whether the connection and its open
    /// transaction are lost (a ``DBError/Code/connectionLost`` error counts as lost too). The
    /// default (in an extension) answers `true`.
    /// - Parameter connection: A connection this engine leased.
    func isConnectionUsable(_ connection: Connection) -> Bool

    /// The database system, as OpenTelemetry's `db.system.name` names it (`"postgresql"`). The
    /// default (in an extension) is `"other_sql"`.
    static var systemName: String { get }

    /// The database the engine's connections use, as OpenTelemetry's `db.namespace` (for
    /// PostgreSQL, the database name); `nil` (the default, in an extension) when unknown.
    var namespace: String? { get }

    /// Closes every connection and stops the pool. Called once; leases still out fail afterwards.
    /// Makes ``run()`` return.
    func shutdown() async

    /// Runs the engine's background work — opening connections, closing idle ones, timing out
    /// leases — until ``shutdown()``, or until the task is cancelled. The connect that created
    /// the engine runs it as a child task of ``DBConnect/run()``. The default (in an extension)
    /// returns at once: an engine without background work needs no running.
    func run() async

    /// Stops new leases, waits until every leased connection is given back — engines bound the
    /// wait (`PostgresEngine.drainTimeout`, 30 s) — then shuts down: for an engine its connect
    /// retired (a demoted primary, a host that left the cluster). The default (in an extension)
    /// calls ``shutdown()``.
    func drainAndShutdown() async
}

/// What an engine reports about a control statement it ran (see
/// ``DatabaseEngine/execute(_:on:)``).
public struct DBControlResult: Sendable, Hashable {
    /// For a `COMMIT` of a transaction that wrote: the position a replica must have replayed to
    /// see it (for PostgreSQL, the WAL LSN, such as `"0/3000060"`). `nil` for every other
    /// statement, and when the engine does not track positions.
    public var consistencyToken: String?

    /// A result that reports nothing: what every statement but a tracked `COMMIT` returns.
    public static let empty = DBControlResult()

    /// Creates a result.
    /// - Parameter consistencyToken: The committed transaction's position, if the engine tracks it.
    public init(consistencyToken: String? = nil) {
        self.consistencyToken = consistencyToken
    }
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

extension DBControlStatement {
    /// The statement's `db.operation.name`: `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`,
    /// `RELEASE SAVEPOINT` or `ROLLBACK TO SAVEPOINT` (never a savepoint's name).
    public var operationName: String {
        switch self {
        case .begin: return "BEGIN"
        case .commit: return "COMMIT"
        case .rollback: return "ROLLBACK"
        case .savepoint: return "SAVEPOINT"
        case .releaseSavepoint: return "RELEASE SAVEPOINT"
        case .rollbackToSavepoint: return "ROLLBACK TO SAVEPOINT"
        }
    }
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

    /// Calls ``shutdown()``.
    public func drainAndShutdown() async { await shutdown() }

    /// Returns at once: no background work.
    public func run() async {}

    /// `"other_sql"`, OpenTelemetry's name for an unlisted SQL database.
    public static var systemName: String { "other_sql" }

    /// `nil`: unknown.
    public var namespace: String? { nil }

    /// Answers `new`: the position of the latest commit.
    public static func latestConsistencyToken(_ current: String?, _ new: String) -> String { new }
}
