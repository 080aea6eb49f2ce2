import CLibPQ
import ContextDB
import ContextDBPostgres
import CoreMetrics
import Logging
import ServiceLifecycle
import Synchronization

/// A `DatabaseEngine` on libpq, PostgreSQL's own client library, on the pool `PostgresEngine`
/// uses: the same lease rules, lease timeout, idle timeout, reset after release (`DISCARD ALL`),
/// fast failure after a failed connect (a wrong password never becomes a storm of logins) and
/// `db.client.connection.*` metrics.
///
/// Connections are opened with libpq's semantics: the connection string (a URI or `key=value`
/// pairs), the `PG*` environment variables, the password file (`~/.pgpass`, `passfile`), the
/// service file (`service=`), Unix-domain sockets, GSSAPI, `sslmode` and its files, several
/// hosts with `target_session_attrs`. libpq's blocking calls run on each connection's own
/// dispatch queue, never on Swift concurrency's cooperative pool.
///
/// Sessions run statements with `query` and its siblings; values
/// interpolated into a ``LibPQQuery`` are bound parameters.
public final class LibPQEngine: DatabaseEngine, Sendable {
    /// A libpq connection.
    public typealias Connection = LibPQConnection

    /// How long after a statement's cancel request the engine waits for an answer before it shuts
    /// the connection's socket down: one second.
    public static let cancelGrace = Duration.seconds(1)
    /// An idle connection is closed after this long: one minute.
    public static var idleTimeout: Duration { PostgresConnectionPool<LibPQConnection>.idleTimeout }
    /// The longest a released connection's reset (`DISCARD ALL`) may take before the
    /// connection is closed instead: five seconds.
    public static let resetTimeout = Duration.seconds(5)

    /// The connection string, as libpq read it.
    public let conninfo: LibPQConninfo
    /// The server this engine connects to (`host:port`), or `nil` to let libpq choose among the
    /// string's hosts (`target_session_attrs`, `load_balance_hosts`).
    public let endpoint: PostgresEndpoint?
    /// The most connections open at once.
    public let maximumConnections: Int
    /// The longest a lease waits for a connection before it fails with `DBError.Code.connectionFailed`.
    public let leaseTimeout: Duration
    /// The deadline of each statement: past it the statement is cancelled (`PQcancel`) and fails
    /// with `DBError.Code.statementTimeout`. `nil`: none.
    public let statementTimeout: Duration?
    /// Whether a committed transaction that wrote records the WAL position after its `COMMIT`
    /// (read-your-own-writes; two more round trips per committed write).
    public let capturesCommitLSN: Bool
    /// Where the engine logs.
    public let logger: Logger

    private let pool: PostgresConnectionPool<LibPQConnection>

    /// Creates an engine. Connects nothing yet.
    /// - Parameters:
    ///   - conninfo: A libpq connection string: a URI or `key=value` pairs.
    ///   - endpoint: The one server to reach (`host` and `port` override the string's), for a
    ///     routed connect; `nil` (the default) for the string's hosts.
    ///   - maximumConnections: The most connections open at once. Default 20.
    ///   - leaseTimeout: The longest a lease waits for a free connection, in seconds. Default 30
    ///     seconds. Opening a connection is bounded by the string's `connect_timeout` (10 s
    ///     unless it says otherwise) instead.
    ///   - statementTimeout: The deadline of each statement. Default none.
    ///   - capturesCommitLSN: Record the WAL position of committed writes. Default `false`.
    ///   - instrumentation: Where the pool's metrics go (its `db.client.connection.*` gauges and
    ///     timeouts). Default: the process-wide backend.
    ///   - poolName: The pool's `db.client.connection.pool.name`: a connect passes its label.
    ///     Default `"default"`.
    ///   - logger: Where the engine logs.
    /// - Throws: `DBError.Code.invalidConfiguration` for a string libpq rejects, or one with
    ///   `hostaddr` given an `endpoint`.
    public init(
        conninfo: String,
        endpoint: PostgresEndpoint? = nil,
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        capturesCommitLSN: Bool = false,
        instrumentation: DBInstrumentation = DBInstrumentation(),
        poolName: String = "default",
        logger: Logger = Logger(label: "ContextDB.LibPQ")
    ) throws {
        let parsed = try LibPQConninfo(conninfo)
        if endpoint != nil, parsed.parameters["hostaddr"] != nil {
            throw DBError(
                .invalidConfiguration,
                "a routed connect chooses each host itself, and the connection string's hostaddr would override it; remove hostaddr"
            )
        }
        self.conninfo = parsed
        self.endpoint = endpoint
        self.maximumConnections = max(1, maximumConnections)
        self.leaseTimeout = leaseTimeout
        self.statementTimeout = statementTimeout
        self.capturesCommitLSN = capturesCommitLSN
        self.logger = logger
        // libpq waits for ever by default; 10 s unless the string says otherwise (it comes later).
        var keywords = [("connect_timeout", "10"), ("dbname", conninfo)]
        if let endpoint { keywords += [("host", endpoint.host), ("port", String(endpoint.port))] }
        let server = endpoint?.description ?? DBConnect<LibPQEngine>.conninfoHost
        var dimensions = [("db.system.name", Self.systemName), ("db.client.connection.pool.name", poolName)]
        if let endpoint { dimensions += [("server.address", endpoint.host), ("server.port", String(endpoint.port))] }
        self.pool = PostgresConnectionPool(
            driver: PoolDriver(
                open: { [keywords] _ in try await LibPQConnection.connect(keywords) },
                isClosed: { (connection: LibPQConnection) in !connection.isUsable },
                closeQuietly: { (connection: LibPQConnection) in connection.closeQuietly() },
                reset: { (connection: LibPQConnection, done: @escaping @Sendable (Bool) -> Void) in
                    connection.reset(within: max(statementTimeout ?? Self.resetTimeout, Self.resetTimeout), done)
                },
                explain: { (error: any Error) in "could not connect: \(error)" }
            ),
            host: server, maximumConnections: self.maximumConnections, leaseTimeout: leaseTimeout, logger: logger,
            metrics: PostgresPoolMetrics(factory: instrumentation.metricsFactory ?? MetricsSystem.factory, dimensions: dimensions)
        )
    }

    /// `"postgresql"`, OpenTelemetry's `db.system.name`.
    public static var systemName: String { "postgresql" }
    /// The database the string names (OpenTelemetry's `db.namespace`).
    public var namespace: String? { conninfo.database }
    /// How many connections sessions hold now.
    public var leasedConnectionCount: Int { pool.leasedCount }
    /// How many connections are open.
    public var openConnectionCount: Int { pool.connectionCount }

    /// Leases a connection: an idle one, a new one, or the next one released.
    /// - Throws: `DBError.Code.connectionFailed` with libpq's reason when connecting failed, when
    ///   no connection came within ``leaseTimeout``, or after ``shutdown()``.
    public func leaseConnection() async throws -> LibPQConnection {
        try await pool.lease()
    }

    /// Gives the connection back. A reusable one is reset (`DISCARD ALL`, after the release,
    /// at most ``resetTimeout`` or the statement timeout) and pooled; one that is not, or whose
    /// reset fails, is closed. Returns at once.
    public func releaseConnection(_ connection: LibPQConnection, reusable: Bool) async {
        pool.release(connection, reusable: reusable && connection.isUsable)
    }

    /// Whether libpq has not seen the connection break.
    public func isConnectionUsable(_ connection: LibPQConnection) -> Bool { connection.isUsable }

    /// Runs a transaction control statement.
    /// - Throws: For `COMMIT`, `DBError.Code.commitFailed` when the server rolled back instead;
    ///   `DBError.Code.commitOutcomeUnknown` when the connection was lost while `COMMIT` ran.
    public func execute(_ statement: DBControlStatement, on connection: LibPQConnection) async throws -> DBControlResult {
        guard statement == .commit else {
            _ = try await run(statement.postgresSQL, on: connection)
            return .empty
        }
        let wrote = capturesCommitLSN
            ? try await run("SELECT pg_current_xact_id_if_assigned() IS NOT NULL", on: connection).rows.first?.first == "t"
            : false
        let result: LibPQResult
        do {
            result = try await run("COMMIT", on: connection)
        } catch where !connection.isUsable && !((error as? DBError)?.underlying is LibPQStatementNotSent) {
            // COMMIT was sent (a lost connection, or a cancelled task whose socket was shut
            // down): whether it committed is unknown. An error raised before sending it is a
            // plain connectionLost, which the session reports as a rollback.
            throw DBError(
                .commitOutcomeUnknown,
                "COMMIT was sent, but the connection was lost before its answer (\((error as? DBError)?.message ?? String(describing: error))); the transaction may have committed: check before retrying",
                host: connection.server, underlying: error
            )
        }
        if result.commandTag == "ROLLBACK" {
            throw DBError(
                .commitFailed,
                "the server rolled the transaction back instead of committing it: a statement of it failed and was not undone with ROLLBACK TO SAVEPOINT; nothing of it was saved",
                host: connection.server
            )
        }
        guard wrote, let position = try? await run("SELECT pg_current_wal_lsn()::text", on: connection).rows.first?.first ?? nil else {
            return .empty
        }
        return DBControlResult(consistencyToken: position)
    }

    /// The later of two WAL positions (`X/Y`).
    public static func latestConsistencyToken(_ current: String?, _ new: String) -> String {
        PostgresEngine.latestConsistencyToken(current, new)
    }

    /// Runs one statement, bounded by ``statementTimeout``.
    func run(_ sql: String, _ parameters: [String?] = [], on connection: LibPQConnection) async throws -> LibPQResult {
        try await connection.execute(sql, parameters, timeout: statementTimeout)
    }

    /// Runs the pool's background work — opening connections, closing idle ones after
    /// ``idleTimeout``, timing out leases — until the task is cancelled or a graceful shutdown
    /// begins (ServiceLifecycle); then shuts down. The connect that created the engine runs it.
    /// Until it runs, leases wait for it, and fail with `DBError.Code.notRunning` at
    /// ``leaseTimeout``.
    public func run() async {
        await cancelWhenGracefulShutdown { await self.pool.run() }
        await shutdown()
    }

    /// Closes every connection — those sessions hold too (a running statement fails at once;
    /// their transactions roll back) — and fails the waiting leases.
    public func shutdown() async {
        await pool.shutdown()
    }

    /// Waits until sessions gave every connection back (at most `PostgresEngine.drainTimeout`),
    /// then shuts down.
    public func drainAndShutdown() async {
        await PostgresEngine.drain(within: PostgresEngine.drainTimeout, until: { await self.pool.drain() }, then: { await self.shutdown() })
    }
}

/// An engine made by hand runs as a ServiceLifecycle `Service` (see ``LibPQEngine/run()``);
/// a connect's engines are run by the connect.
extension LibPQEngine: Service {}
