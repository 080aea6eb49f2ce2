import ContextDB
import CoreMetrics
import Logging
import NIOSSL
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// A `DatabaseEngine` on PostgresNIO: a pool of `PostgresConnection`s to one server.
///
/// A session leases a connection for its whole life; a lease is served by the most recently
/// released idle connection, by a new one, or by the next one released (first come, first
/// served), never by a task of its own. Every lease ends with the connection back in the pool —
/// or closed, when it may still be inside a transaction. The pool never holds more than
/// ``maximumConnections``, and closes a connection idle for a minute.
///
/// A connect that fails fails the leases that no other connection can serve, with the
/// server's own reason (a wrong password, an unknown database, an unreachable host); for a
/// second afterwards such leases fail at once without a new login attempt. A lease that gets
/// no connection within ``leaseTimeout`` fails too.
///
/// No statement waits forever: one on a connection the server closed fails at once with
/// `DBError.Code.connectionLost` (the connection is discarded), and with a
/// ``statementTimeout`` a statement past its deadline is cancelled, then its connection closed.
/// A connection released clean has its session state reset (``resetsSessionState``) before the
/// next lease gets it.
public final class PostgresEngine: DatabaseEngine {
    public typealias Connection = PostgresConnection

    /// The server this engine connects to.
    public let endpoint: PostgresEndpoint
    /// The most connections the engine keeps open at once.
    public let maximumConnections: Int
    /// The longest a lease waits for a connection (pool exhausted, server slow) before failing.
    public let leaseTimeout: Duration
    /// The logger for the engine's own messages and its statements.
    public let logger: Logger
    /// Whether a commit of a transaction that wrote records its WAL position in the request
    /// context (`DBContext.consistencyToken`) for read-your-own-writes. It costs one
    /// round trip per commit, and one more when the transaction wrote.
    public let capturesCommitLSN: Bool
    /// The client-side deadline of every statement (the session's, `BEGIN`, `COMMIT`,
    /// `ROLLBACK`); `nil` for none. At the deadline the engine sends a cancel request
    /// (`pg_cancel_backend`, from a connection of its own), and when the server answers neither
    /// within ``cancelGrace`` — a frozen host — it closes the connection. The statement then fails
    /// with `DBError.Code.statementTimeout`; when the connection was closed, the
    /// session also treats its transaction as lost.
    ///
    /// > Note: A cancel names the backend process, so it needs a direct session to the server;
    /// > behind a pooler in transaction mode (PgBouncer) use the pooler's `query_timeout` instead.
    public let statementTimeout: Duration?
    /// Whether a connection released clean is reset before the next lease: `RESET ALL`, `SET
    /// SESSION AUTHORIZATION DEFAULT`, advisory locks released, temporary tables dropped, `LISTEN`
    /// channels and open (`WITH HOLD`) cursors closed — what PostgreSQL's `DISCARD ALL` does, but
    /// keeping the connection's prepared statements. One round trip, run after the release,
    /// not on the request's path. A connection whose reset fails is closed. Turn it off when
    /// code keeps PostgresNIO `listen` subscriptions on pooled connections: `UNLISTEN *` ends them.
    public let resetsSessionState: Bool
    /// How many statements each connection prepares, PostgreSQL's named prepared statements
    /// reused across sessions: a statement a session runs twice on a connection is parsed and
    /// planned once. Counted per connection over its life (failed statements included); past it,
    /// statements run unnamed. `0` turns preparing off — needed behind a pooler in transaction
    /// mode (PgBouncer before 1.21, or without `max_prepared_statements`). A session opts one
    /// statement out with `prepared: false`. Default 100, as asyncpg's `statement_cache_size`.
    public let statementCacheSize: Int
    /// How long after a statement's cancel request the engine waits for an answer before it
    /// closes the connection: one second.
    public static let cancelGrace = Duration.seconds(1)

    private let pool: PostgresConnectionPool<PostgresConnection>
    private let statements: PostgresStatementCache
    /// How to open a direct connection (the pool's, the cancel connection), or why that is impossible.
    let connectionConfiguration: Result<PostgresConnection.Configuration, DBError>
    /// Backend process IDs of the pool's connections, for cancel requests (learnt only when a
    /// statement timeout is set).
    let backendPIDs = BackendPIDs()
    /// Connections a statement found lost (a FATAL error may arrive before the channel closes),
    /// until they close.
    /// (The connection is kept in the entry, so that no new connection takes its identifier first.)
    private let condemned = Mutex<[ObjectIdentifier: PostgresConnection]>([:])
    /// The engine's own connection for cancel requests, opened on the first one and kept;
    /// `closed` once the engine shut down.
    let canceller = Mutex<(connecting: Task<PostgresConnection?, Never>?, closed: Bool)>((nil, false))

    /// Creates an engine from PostgresNIO's client configuration. Connects nothing yet.
    ///
    /// From `configuration` the engine takes the server, credentials, TLS setting,
    /// `options.connectTimeout`, `options.tlsServerName`, `options.requireBackendKeyData`,
    /// `options.additionalStartupParameters` and `options.maximumConnections`; the other
    /// pool options do not apply. When the TLS setting cannot be read (a PostgresNIO version
    /// that changed it), every lease fails with `DBError.Code.invalidConfiguration`.
    /// - Parameters:
    ///   - configuration: PostgresNIO's client configuration (host, credentials, TLS, pool size).
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of every statement (see ``statementTimeout``). Default none.
    ///   - resetsSessionState: Reset a released connection's session state (see ``resetsSessionState``). Default `true`.
    ///   - statementCacheSize: How many statements each connection prepares (see ``statementCacheSize``). Default 100.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - instrumentation: Where the pool's metrics go (its `db.client.connection.*` gauges and
    ///     timeouts). Default: the process-wide backend.
    ///   - poolName: The pool's `db.client.connection.pool.name`: a connect passes its label.
    ///     Default `"default"`.
    ///   - logger: Where the engine logs. Default: label `ContextDB.Postgres`.
    public convenience init(
        configuration: PostgresClient.Configuration,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
        statementCacheSize: Int = 100,
        capturesCommitLSN: Bool = false,
        instrumentation: DBInstrumentation = DBInstrumentation(),
        poolName: String = "default",
        logger: Logger = Logger(label: "ContextDB.Postgres")
    ) {
        let endpoint = PostgresEndpoint(host: configuration.host ?? "localhost", port: configuration.port ?? 5432)
        self.init(
            endpoint: endpoint, connection: PostgresConnection.Configuration.converting(configuration, host: endpoint.description),
            maximumConnections: configuration.options.maximumConnections, leaseTimeout: leaseTimeout,
            statementTimeout: statementTimeout, resetsSessionState: resetsSessionState,
            statementCacheSize: statementCacheSize, capturesCommitLSN: capturesCommitLSN,
            instrumentation: instrumentation, poolName: poolName, logger: logger
        )
    }

    /// Creates an engine for one server of a URI. Connects nothing yet.
    /// - Parameters:
    ///   - url: The parsed URI (credentials, database, TLS, timeouts).
    ///   - endpoint: Which server; default the URI's first.
    ///   - maximumConnections: The pool's size. Default 20.
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of every statement (see ``statementTimeout``). Default none.
    ///   - resetsSessionState: Reset a released connection's session state (see ``resetsSessionState``). Default `true`.
    ///   - statementCacheSize: How many statements each connection prepares (see ``statementCacheSize``). Default 100.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - instrumentation: Where the pool's metrics go (its `db.client.connection.*` gauges and
    ///     timeouts). Default: the process-wide backend.
    ///   - poolName: The pool's `db.client.connection.pool.name`: a connect passes its label.
    ///     Default `"default"`.
    ///   - logger: Where the engine logs.
    /// - Throws: `DBError.Code.invalidConfiguration` when the TLS settings cannot be built.
    public convenience init(
        url: PostgresURL,
        endpoint: PostgresEndpoint? = nil,
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
        statementCacheSize: Int = 100,
        capturesCommitLSN: Bool = false,
        instrumentation: DBInstrumentation = DBInstrumentation(),
        poolName: String = "default",
        logger: Logger = Logger(label: "ContextDB.Postgres")
    ) throws {
        let endpoint = endpoint ?? url.endpoints[0]
        let connection: PostgresConnection.Configuration
        do {
            connection = try url.connectionConfiguration(for: endpoint)
        } catch {
            let files = [("sslrootcert", url.sslRootCert), ("sslcert", url.sslCert), ("sslkey", url.sslKey)]
                .compactMap { name, path in path.map { "\(name)=\($0)" } }
            throw DBError(
                .invalidConfiguration,
                "could not set up TLS for sslmode=\(url.sslMode.rawValue)"
                    + (files.isEmpty ? "" : " with \(files.joined(separator: ", ")); check that each file is PEM (a key not encrypted)")
                    + ": \(DBError.redactingSourcePaths(String(describing: error)))",
                host: endpoint.description, underlying: error
            )
        }
        self.init(
            endpoint: endpoint, connection: .success(connection), keepalive: url.keepalive, maximumConnections: maximumConnections,
            leaseTimeout: leaseTimeout, statementTimeout: statementTimeout, resetsSessionState: resetsSessionState,
            statementCacheSize: statementCacheSize, capturesCommitLSN: capturesCommitLSN,
            instrumentation: instrumentation, poolName: poolName, logger: logger
        )
    }

    private init(
        endpoint: PostgresEndpoint,
        connection: Result<PostgresConnection.Configuration, DBError>,
        keepalive: PostgresKeepalive? = nil,
        maximumConnections: Int,
        leaseTimeout: Duration,
        statementTimeout: Duration?,
        resetsSessionState: Bool,
        statementCacheSize: Int,
        capturesCommitLSN: Bool,
        instrumentation: DBInstrumentation,
        poolName: String,
        logger: Logger
    ) {
        self.capturesCommitLSN = capturesCommitLSN
        self.namespace = try? connection.get().database
        self.statementTimeout = statementTimeout
        self.resetsSessionState = resetsSessionState
        self.statementCacheSize = max(0, statementCacheSize)
        self.statements = PostgresStatementCache(capacity: max(0, statementCacheSize))
        self.endpoint = endpoint
        var logger = logger
        logger[metadataKey: "db.host"] = "\(endpoint)"
        self.logger = logger
        self.leaseTimeout = leaseTimeout
        self.maximumConnections = max(1, maximumConnections)
        self.connectionConfiguration = connection
        let backendPIDs = self.backendPIDs
        let host = endpoint.description
        let resetBound = max(statementTimeout ?? Self.resetTimeout, Self.resetTimeout)
        var driver = PoolDriver<PostgresConnection>(
            open: { [logger] (id: Int) async throws -> PostgresConnection in
                let configuration = try connection.get()  // or why connecting is impossible
                if let keepalive {
                    return try await keepalive.connect(to: endpoint, configuration: configuration, id: id, logger: logger)
                }
                return try await PostgresConnection.connect(configuration: configuration, id: id, logger: logger)
            },
            isClosed: { (connection: PostgresConnection) in connection.isClosed },
            closeQuietly: { (connection: PostgresConnection) in connection.closeQuietly() },
            reset: resetsSessionState ? Self.reset(within: resetBound, logger: logger) : nil,
            explain: { (error: any Error) in PostgresEngine.explain(error, host: host) }
        )
        driver.prepare = { [logger] (connection: PostgresConnection) in
            guard let statementTimeout else { return }
            await backendPIDs.learn(connection, host: host, logger: logger, timeout: statementTimeout)
        }
        driver.onClose = { (connection: PostgresConnection, closed: @escaping @Sendable () -> Void) in
            connection.closeFuture.whenComplete { _ in closed() }
        }
        self.pool = PostgresConnectionPool(
            driver: driver, host: host, maximumConnections: maximumConnections, leaseTimeout: leaseTimeout, logger: logger,
            metrics: PostgresPoolMetrics(
                factory: instrumentation.metricsFactory ?? MetricsSystem.factory,
                dimensions: [
                    ("db.system.name", Self.systemName), ("db.client.connection.pool.name", poolName),
                    ("server.address", endpoint.host), ("server.port", String(endpoint.port)),
                ]
            )
        )
    }

    /// Runs ``resetQuery`` on a released connection, bounded by `bound`, on event-loop callbacks.
    private static func reset(
        within bound: Duration, logger: Logger
    ) -> @Sendable (PostgresConnection, @escaping @Sendable (Bool) -> Void) -> Void {
        { connection, done in
            connection.sendGuarded(resetQuery, logger: logger, timeout: bound).whenComplete { result in
                if case .failure(let error) = result {
                    logger.debug("could not reset a released connection; closing it", metadata: ["error": "\(String(reflecting: error))"])
                }
                done((try? result.get()) != nil)
            }
        }
    }

    /// The shortest bound of a released connection's reset: this, or the statement timeout when
    /// longer.
    static let resetTimeout = Duration.seconds(5)

    /// `"postgresql"`, OpenTelemetry's `db.system.name`.
    public static var systemName: String { "postgresql" }

    /// The database the connections use (OpenTelemetry's `db.namespace`).
    public let namespace: String?

    /// How many connections sessions hold right now (leased and not yet released).
    public var leasedConnectionCount: Int { pool.leasedCount }
    /// How many connections the engine has open or is opening.
    public var openConnectionCount: Int { pool.connectionCount }

    // MARK: - Leasing

    /// Leases a connection: an idle one, a new one, or the next one released.
    /// - Throws: `DBError.Code.connectionFailed` with the server's reason when
    ///   connecting failed, when no connection came within ``leaseTimeout``, or after
    ///   ``shutdown()``; `DBError.Code.invalidConfiguration` for an engine whose
    ///   configuration cannot connect; `CancellationError` when the task was cancelled.
    public func leaseConnection() async throws -> PostgresConnection {
        while true {
            let connection = try await pool.lease()
            if isConnectionUsable(connection) { return connection }
            pool.release(connection, reusable: false)  // closed while idle: take another
        }
    }

    /// Gives the connection back: it is reset and pooled, or closed when `reusable` is false
    /// or it was lost. Returns at once; the reset runs after.
    public func releaseConnection(_ connection: PostgresConnection, reusable: Bool) async {
        pool.release(connection, reusable: reusable && isConnectionUsable(connection))
    }

    /// Runs a transaction control statement, bounded by ``statementTimeout``.
    ///
    /// - Throws: For `COMMIT`, `DBError.Code.commitFailed` when the server answers
    ///   with the tag `ROLLBACK` (it rolled back an aborted transaction); when the connection is
    ///   lost while `COMMIT` runs, `DBError.Code.commitOutcomeUnknown`. See
    ///   ``query(_:on:logger:)`` for the rest.
    @discardableResult
    public func execute(_ statement: DBControlStatement, on connection: PostgresConnection) async throws -> DBControlResult {
        guard statement == .commit else {
            _ = try await query(PostgresQuery(unsafeSQL: statement.postgresSQL), on: connection, logger: logger)
            return .empty
        }
        let wrote = capturesCommitLSN
            ? try await query(Self.wroteQuery, on: connection, logger: logger).first?.decode(Bool.self) ?? false
            : false
        let result: PostgresQueryResult
        do {
            result = try await query(Self.commitQuery, on: connection, logger: logger)
        } catch let error as DBError where !(error.underlying is StatementNotSent) && !isConnectionUsable(connection) {
            throw DBError(
                .commitOutcomeUnknown,
                "COMMIT was sent, but the connection was lost before its answer (\(error.message)); the transaction may have committed: check before retrying",
                host: endpoint.description, underlying: error
            )
        }
        if result.metadata.command == "ROLLBACK" {
            throw DBError(
                .commitFailed,
                "the server rolled the transaction back instead of committing it: a statement of it failed and was not undone with ROLLBACK TO SAVEPOINT; nothing of it was saved",
                host: endpoint.description
            )
        }
        guard wrote else { return .empty }
        // After COMMIT: the commit record is before this position, so a replica that replayed
        // up to it sees the transaction.
        do {
            let text = try await query(Self.positionQuery, on: connection, logger: logger).first?.decode(String.self)
            guard let text, let position = PostgresLSN(text) else { return .empty }
            return DBControlResult(consistencyToken: position.description)
        } catch {
            logger.warning("committed, but could not read the WAL position for read-your-own-writes", metadata: ["error": "\(String(reflecting: error))"])
            return .empty
        }
    }

    /// The later of two WAL positions (`"0/3000060"`); a token that is not a position loses.
    /// - Parameters:
    ///   - current: The context's position, if any.
    ///   - new: The position a commit reported.
    /// - Returns: The later position.
    public static func latestConsistencyToken(_ current: String?, _ new: String) -> String {
        guard let current, let old = PostgresLSN(current) else { return new }
        guard let position = PostgresLSN(new) else { return current }
        return max(old, position).description
    }

    /// Runs one statement on a connection this engine leased and collects its rows, bounded by
    /// ``statementTimeout`` and never waiting on a connection the server closed.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - connection: A connection of this engine.
    ///   - logger: Where PostgresNIO logs the statement.
    /// - Returns: The rows and the command tag (`result.metadata.command`).
    /// - Throws: `DBError.Code.connectionLost` when the server closed the connection
    ///   (with its message and SQLSTATE when it sent one: 57P01, 25P03, 40001…),
    ///   `DBError.Code.statementTimeout` when the deadline cancelled the statement,
    ///   else PostgresNIO's `PSQLError`.
    public func query(_ query: PostgresQuery, on connection: PostgresConnection, logger: Logger) async throws -> PostgresQueryResult {
        do {
            return try await connection.guardedQuery(
                query, host: endpoint.description, logger: logger, timeout: statementTimeout, cancel: cancelRequest(for: connection)
            )
        } catch {
            throw condemnIfLost(connection, error)
        }
    }

    /// How a statement on `connection` past its deadline is cancelled; `nil` without a deadline.
    private func cancelRequest(for connection: PostgresConnection) -> (@Sendable () async -> Bool)? {
        guard statementTimeout != nil else { return nil }
        return { [self] in await cancelStatement(on: connection) }
    }

    /// Condemns the connection when `error` says it is lost; returns `error`.
    private func condemnIfLost(_ connection: PostgresConnection, _ error: any Error) -> any Error {
        if let error = error as? DBError, error.code == .connectionLost || error.underlying is ClosedAtDeadline {
            condemn(connection)
        }
        return error
    }

    /// Runs one statement and collects its rows, prepared on the connection when `prepared` and
    /// the statement cache has room (see ``statementCacheSize``); bounded and classified as
    /// ``query(_:on:logger:)``.
    func rows(_ query: PostgresQuery, on connection: PostgresConnection, logger: Logger, prepared: Bool) async throws -> [PostgresRow] {
        guard prepared, let plan = statements.plan(for: query, on: connection) else {
            return try await self.query(query, on: connection, logger: logger).rows
        }
        do {
            return try await connection.guarded(
                host: endpoint.description, timeout: statementTimeout, cancel: cancelRequest(for: connection), grace: Self.cancelGrace
            ) { _ in
                try await statements.run(plan, query, on: connection, logger: logger)
            }
        } catch {
            statements.failed(plan, on: connection, error: (error as? DBError)?.underlying ?? error)
            throw condemnIfLost(connection, error)
        }
    }

    /// Whether the connection can still run statements: not closed, and no statement found it lost.
    public func isConnectionUsable(_ connection: PostgresConnection) -> Bool {
        !connection.isClosed && condemned.withLock { $0[ObjectIdentifier(connection)] } == nil
    }

    /// Marks a connection lost and closes it; the mark goes when it has closed.
    private func condemn(_ connection: PostgresConnection) {
        let id = ObjectIdentifier(connection)
        guard condemned.withLock({ $0.updateValue(connection, forKey: id) == nil }) else { return }
        connection.closeFuture.whenComplete { [self] _ in
            condemned.withLock { _ = $0.removeValue(forKey: id) }
        }
        connection.closeQuietly()
    }

    private static let commitQuery: PostgresQuery = "COMMIT"
    private static let wroteQuery: PostgresQuery = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
    private static let positionQuery: PostgresQuery = "SELECT pg_current_wal_lsn()::text"

    /// Runs the engine's background work — opening connections, closing idle ones after a
    /// minute, timing out leases — until ``shutdown()``; cancelling the task, or a graceful
    /// shutdown of its `ServiceGroup`, shuts the engine down. A `DBConnect` runs the engines it creates (in `DBConnect.run()`); call it yourself,
    /// in a task of your own, for an engine you made. Until it runs, leases wait for it (a
    /// warning is logged after a second), and fail with `DBError.Code.notRunning` at
    /// ``leaseTimeout``.
    public func run() async {
        // Also as a service of its own (a ServiceGroup): a graceful shutdown ends it.
        await cancelWhenGracefulShutdown { await self.pool.run() }
        await shutdown()
    }

    /// Waits until no session holds a connection of this engine — at most ``drainTimeout`` —
    /// then shuts it down: for a host that left the cluster or a demoted primary.
    public func drainAndShutdown() async {
        await drainAndShutdown(within: Self.drainTimeout)
    }

    /// The longest ``drainAndShutdown()`` waits for sessions to give their connections back —
    /// a demoted primary's engine, a vanished host's — before it closes those still held, which
    /// rolls back their transactions: 30 seconds.
    public static let drainTimeout = Duration.seconds(30)

    /// Waits until sessions gave every connection back, at most `bound` (or until the task is
    /// cancelled), then shuts down.
    package func drainAndShutdown(within bound: Duration) async {
        await Self.drain(within: bound, until: { await self.pool.drain() }, then: { await self.shutdown() })
    }

    /// Waits for `drained` at most `bound` (or until the task is cancelled), then runs
    /// `shutdown` — which must end a `drained` still waiting. For engine modules' drains.
    package static func drain(
        within bound: Duration, until drained: @escaping @Sendable () async -> Void, then shutdown: () async -> Void
    ) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await drained() }
            group.addTask { try? await Task.sleep(for: bound) }
            await group.next()
            group.cancelAll()  // ends the sleep; the shutdown below ends a drain still waiting
            await shutdown()
        }
    }

    /// Closes every connection — those sessions still hold too (closing rolls back their
    /// transactions) — and fails the leases still waiting, then closes the cancel connection.
    public func shutdown() async {
        await pool.shutdown()
        let cancelling = canceller.withLock { state in
            state.closed = true
            return state.connecting
        }
        if let control = await cancelling?.value { try? await control.close() }
    }

    // MARK: - Session state

    /// What a released connection runs before the next lease: `DISCARD ALL` without
    /// `DEALLOCATE ALL` and `DISCARD PLANS`, which would drop the connection's prepared
    /// statements (PostgreSQL docs, "DISCARD"). One round trip: a `DO` block, as the extended
    /// query protocol takes one statement at a time.
    static let resetQuery: PostgresQuery = """
        DO $contextdb_reset$ BEGIN
          EXECUTE 'CLOSE ALL';
          EXECUTE 'SET SESSION AUTHORIZATION DEFAULT';
          EXECUTE 'RESET ALL';
          EXECUTE 'UNLISTEN *';
          PERFORM pg_advisory_unlock_all();
          EXECUTE 'DISCARD TEMP';
          EXECUTE 'DISCARD SEQUENCES';
        END $contextdb_reset$
        """

    // MARK: - Errors

    /// A sentence for a connection failure: the server's own reason when it gave one; for a TLS
    /// failure, which check failed and the fix. Never a source path of the build.
    /// - Parameter host: The server, `host:port`, named in TLS failures.
    static func explain(_ error: any Error, host: String? = nil) -> String {
        if let error = error as? DBError { return error.message }  // already explained (a keepalive socket's connect)
        guard let error = error as? PSQLError else {
            return explainTLS(error, host: host) ?? "could not connect: \(DBError.redactingSourcePaths(String(describing: error)))"
        }
        switch error.code {
        case .server:
            let message = error.serverInfo?[.message] ?? "no message"
            let state = error.serverInfo?[.sqlState] ?? "?"
            return "the server refused the connection: \(message) (SQLSTATE \(state)); check the user, password and database"
        case .authMechanismRequiresPassword:
            return "the server asks for a password and none was given; put it in the URI (postgresql://user:password@host/…) or the configuration"
        case .unsupportedAuthMechanism:
            return "the server asks for an authentication method PostgresNIO does not support (\(error.underlying.map { String(describing: $0) } ?? "unknown")); "
                + "use scram-sha-256, md5, password or trust for this role in pg_hba.conf"
        case .sslUnsupported:
            return "TLS: the server\(host.map { " at \($0)" } ?? "") does not accept TLS connections, and this connect requires TLS "
                + "(sslmode=require, verify-ca or verify-full); turn ssl on in the server's postgresql.conf, "
                + "or use sslmode=prefer (TLS when the server offers it) or sslmode=disable"
        case .connectionError:
            if let underlying = error.underlying, let tls = explainTLS(underlying, host: host) { return tls }
            let reason = error.underlying.map { DBError.redactingSourcePaths(String(describing: $0)) } ?? "connection error"
            return "could not reach the server: \(reason); check the host, the port and that the server runs"
        case .poolClosed:
            return "the engine was shut down (DBConnect.close()); a new session creates a new engine"
        default:
            return "could not connect (\(error.code)); check the host, port, TLS settings and credentials"
        }
    }

    /// A sentence for a failed TLS handshake (swift-nio-ssl's errors), or `nil` for another error.
    static func explainTLS(_ error: any Error, host: String?) -> String? {
        let server = host.map { "of \($0) " } ?? ""
        if let error = error as? NIOSSLExtraError, error == .failedToValidateHostname {
            return "TLS: the server's certificate does not name the host \(host ?? "") (sslmode=verify-full checks the name); "
                + "connect by a name the certificate lists in its subjectAltName, or use sslmode=verify-ca to check only that a trusted CA signed it"
        }
        guard let error = error as? NIOSSLError else { return nil }
        switch error {
        case .handshakeFailed(let reason):
            let text = String(describing: reason)
            if text.contains("CERTIFICATE_VERIFY_FAILED") {
                return "TLS: the certificate \(server)failed verification: no CA this client trusts signed it, or it is expired or not yet valid; "
                    + "pass the CA that signed it with sslrootcert=<file.pem> (or TLSConfiguration.trustRoots), "
                    + "or use sslmode=require to encrypt without verifying the server"
            }
            // BoringSSL's reason code: "error:…:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER at <file>:<line>".
            let code = text.firstRange(of: "OPENSSL_internal:").map { text[$0.upperBound...].prefix { $0.isUppercase || $0.isNumber || $0 == "_" } }
            return "TLS: the handshake with the server \(server)failed (\(code.map(String.init) ?? "no reason given")); "
                + "check that sslmode and the server's TLS settings (ssl, its certificate, ssl_min_protocol_version) agree"
        default:
            return "TLS: the connection \(server)failed (\(error)); check sslmode and the server's TLS settings"
        }
    }
}

/// An engine made by hand runs as a ServiceLifecycle `Service` (see ``PostgresEngine/run()``);
/// a connect's engines are run by the connect.
extension PostgresEngine: Service {}
