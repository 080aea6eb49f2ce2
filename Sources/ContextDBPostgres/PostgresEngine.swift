import ContextDB
import Logging
import PostgresNIO
import Synchronization

/// A ``DatabaseEngine`` on PostgresNIO's `PostgresClient`: its pool, one engine per server.
///
/// The client's `run()` lives as long as the engine and stops in ``shutdown()``.
/// A session's lease outlives one `withConnection {}` call (see `PostgresLease`), and every lease
/// ends with the connection back in the pool — or closed, when it may still be inside a
/// transaction.
///
/// PostgresNIO's pool retries a failing connection quietly, so a wrong password or an unknown
/// database would make a lease wait forever. A lease that waits longer than a second (or the
/// connect timeout, if shorter) therefore probes the server once with a direct connection; if
/// the probe fails, the lease fails with the server's reason. A lease that gets no connection
/// within ``leaseTimeout`` fails too.
public final class PostgresEngine: DatabaseEngine {
    public typealias Connection = PostgresConnection

    /// The server this engine connects to.
    public let endpoint: PostgresEndpoint
    /// The PostgresNIO client and pool. Run by the engine; do not call `run()` on it.
    public let client: PostgresClient
    /// The longest a lease waits for a connection (pool exhausted, server slow) before failing.
    public let leaseTimeout: Duration
    /// The logger for the engine's own messages and its statements.
    public let logger: Logger
    /// Whether a commit of a transaction that wrote records its WAL position in the request
    /// context (``ContextDB/DBContext/consistencyToken``) for read-your-own-writes. It costs one
    /// round trip per commit, and one more when the transaction wrote.
    public let capturesCommitLSN: Bool

    private struct Outstanding: Sendable {
        let lease: PostgresLease
        let holder: Task<Void, Never>
    }

    private let runTask: Task<Void, Never>
    private let outstanding = Mutex<[ObjectIdentifier: Outstanding]>([:])
    private let idleWaiters = Mutex<[CheckedContinuation<Void, Never>]>([])
    private let connectTimeout: Duration
    /// A configuration for a direct diagnostic connection with the same TLS rules as the pool's;
    /// `nil` when that cannot be derived (then no probe sends credentials anywhere).
    private let probeConfiguration: PostgresConnection.Configuration?
    private let probe = Mutex<(task: Task<DBError?, Never>, started: ContinuousClock.Instant)?>(nil)

    /// Creates an engine for a server and starts its pool. Connects nothing yet.
    /// - Parameters:
    ///   - configuration: PostgresNIO's client configuration (host, credentials, TLS, pool size).
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - logger: Where the engine logs. Default: label `ContextDB.Postgres`.
    public convenience init(
        configuration: PostgresClient.Configuration,
        leaseTimeout: Duration = .seconds(30),
        capturesCommitLSN: Bool = false,
        logger: Logger = Logger(label: "ContextDB.Postgres")
    ) {
        self.init(
            configuration: configuration, probe: nil, leaseTimeout: leaseTimeout,
            capturesCommitLSN: capturesCommitLSN, logger: logger
        )
    }

    /// Creates an engine for one server of a URI and starts its pool. Connects nothing yet.
    /// - Parameters:
    ///   - url: The parsed URI (credentials, database, TLS, timeouts).
    ///   - endpoint: Which server; default the URI's first.
    ///   - maximumConnections: The pool's size. Default 20.
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - logger: Where the engine logs.
    /// - Throws: ``DBError/Code/invalidConfiguration`` when the TLS settings cannot be built.
    public convenience init(
        url: PostgresURL,
        endpoint: PostgresEndpoint? = nil,
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        capturesCommitLSN: Bool = false,
        logger: Logger = Logger(label: "ContextDB.Postgres")
    ) throws {
        let endpoint = endpoint ?? url.endpoints[0]
        var configuration = url.configuration(for: endpoint)
        configuration.options.maximumConnections = maximumConnections
        let probe: PostgresConnection.Configuration
        do {
            probe = try url.connectionConfiguration(for: endpoint)
        } catch {
            throw DBError(
                .invalidConfiguration, "could not set up TLS for sslmode=\(url.sslMode)",
                host: endpoint.description, underlying: error
            )
        }
        self.init(
            configuration: configuration, probe: probe, leaseTimeout: leaseTimeout,
            capturesCommitLSN: capturesCommitLSN, logger: logger
        )
    }

    private init(
        configuration: PostgresClient.Configuration,
        probe: PostgresConnection.Configuration?,
        leaseTimeout: Duration,
        capturesCommitLSN: Bool,
        logger: Logger
    ) {
        self.capturesCommitLSN = capturesCommitLSN
        self.endpoint = PostgresEndpoint(host: configuration.host ?? "localhost", port: configuration.port ?? 5432)
        var logger = logger
        logger[metadataKey: "db.host"] = "\(endpoint)"
        self.logger = logger
        self.leaseTimeout = leaseTimeout
        self.connectTimeout = configuration.options.connectTimeout
        self.probeConfiguration = probe
        let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
        self.client = client
        // Detached: the pool must not inherit the request context of whoever created the engine.
        self.runTask = Task.detached { await client.run() }
    }

    /// How many connections sessions hold right now (leased and not yet released).
    public var leasedConnectionCount: Int { outstanding.withLock { $0.count } }

    // MARK: - Leasing

    public func leaseConnection() async throws -> PostgresConnection {
        let lease = PostgresLease()
        let holder = Task.detached { [client] in
            do {
                try await client.withConnection { connection in
                    guard lease.deliver(connection) else { return }
                    if await !lease.waitForRelease() {
                        // Possibly inside a transaction: never let the next borrower inherit it.
                        try? await connection.close()
                    }
                }
            } catch {
                lease.abandon(error)
            }
        }
        let watchdog = Task.detached { [self] in
            do {
                try await Task.sleep(for: min(.seconds(1), connectTimeout))
                if let failure = await diagnose() {
                    if lease.abandon(failure) { holder.cancel() }
                    return
                }
                try await Task.sleep(for: leaseTimeout - min(.seconds(1), connectTimeout))
                let timeout = DBError(
                    .connectionFailed,
                    "no connection became free within \(leaseTimeout); the pool may be too small for the load, or sessions are held too long",
                    host: endpoint.description
                )
                if lease.abandon(timeout) { holder.cancel() }
            } catch {}  // cancelled: the lease completed
        }
        do {
            let connection = try await withTaskCancellationHandler {
                try await lease.connection()
            } onCancel: {
                if lease.abandon(CancellationError()) { holder.cancel() }
            }
            watchdog.cancel()
            outstanding.withLock { $0[ObjectIdentifier(connection)] = Outstanding(lease: lease, holder: holder) }
            return connection
        } catch {
            watchdog.cancel()
            if error is DBError || error is CancellationError { throw error }
            throw DBError(
                .connectionFailed, Self.explain(error),
                host: endpoint.description, underlying: error
            )
        }
    }

    public func releaseConnection(_ connection: PostgresConnection, reusable: Bool) async {
        guard let lease = outstanding.withLock({ $0.removeValue(forKey: ObjectIdentifier(connection)) }) else {
            return  // already released (engine shut down)
        }
        lease.lease.release(reusable: reusable)
        await lease.holder.value
        if outstanding.withLock({ $0.isEmpty }) {
            for waiter in idleWaiters.withLock({ waiters in defer { waiters.removeAll() }; return waiters }) {
                waiter.resume()
            }
        }
    }

    public func execute(_ statement: DBControlStatement, on connection: PostgresConnection) async throws {
        guard statement == .commit, capturesCommitLSN else {
            _ = try await connection.query(PostgresQuery(unsafeSQL: statement.sql), logger: logger)
            return
        }
        let wrote = try await connection.query(Self.wroteQuery, logger: logger).collect().first?.decode(Bool.self) ?? false
        _ = try await connection.query(PostgresQuery(unsafeSQL: statement.sql), logger: logger)
        guard wrote else { return }
        // After COMMIT: the commit record is before this position, so a replica that replayed
        // up to it sees the transaction.
        do {
            let text = try await connection.query(Self.positionQuery, logger: logger).collect().first?.decode(String.self)
            if let text, let position = PostgresLSN(text) {
                DBContext.current?.advanceConsistencyToken(to: position)
            }
        } catch {
            logger.warning("committed, but could not read the WAL position for read-your-own-writes", metadata: ["error": "\(String(reflecting: error))"])
        }
    }

    private static let wroteQuery: PostgresQuery = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
    private static let positionQuery: PostgresQuery = "SELECT pg_current_wal_lsn()::text"

    /// Waits until no session holds a connection of this engine, then shuts it down — for a
    /// host that left the cluster or a demoted primary.
    public func drainAndShutdown() async {
        await withCheckedContinuation { continuation in
            let idle = outstanding.withLock { leases in
                if leases.isEmpty { return true }
                idleWaiters.withLock { $0.append(continuation) }
                return false
            }
            if idle { continuation.resume() }
        }
        await shutdown()
    }

    public func abortsTransaction(_ error: any Error) -> Bool {
        !(error is PostgresDecodingError)
    }

    public func shutdown() async {
        let leases = outstanding.withLock { state in
            defer { state.removeAll() }
            return Array(state.values)
        }
        for lease in leases { lease.lease.release(reusable: false) }
        for lease in leases { await lease.holder.value }
        runTask.cancel()
        await runTask.value
    }

    // MARK: - Diagnosis

    /// Connects once, directly, to find out why the pool hands out nothing. One probe at a time
    /// per engine; a result is reused for a second. `nil` when the server accepts us.
    private func diagnose() async -> DBError? {
        guard let probeConfiguration else { return nil }
        let task = probe.withLock { state -> Task<DBError?, Never> in
            if let state, state.started.duration(to: .now) < .seconds(1) { return state.task }
            let task = Task.detached { [endpoint, logger] () -> DBError? in
                do {
                    let connection = try await PostgresConnection.connect(
                        configuration: probeConfiguration, id: 0, logger: logger
                    )
                    try? await connection.close()
                    return nil
                } catch {
                    logger.debug("connection probe failed", metadata: ["reason": "\(Self.explain(error))"])
                    return DBError(.connectionFailed, Self.explain(error), host: endpoint.description, underlying: error)
                }
            }
            state = (task, .now)
            return task
        }
        return await task.value
    }

    /// A sentence for a connection failure: the server's own reason when it gave one.
    static func explain(_ error: any Error) -> String {
        guard let error = error as? PSQLError else {
            return "could not connect: \(error)"
        }
        switch error.code {
        case .server:
            let message = error.serverInfo?[.message] ?? "no message"
            let state = error.serverInfo?[.sqlState] ?? "?"
            return "the server refused the connection: \(message) (SQLSTATE \(state)); check the user, password and database"
        case .connectionError:
            return "could not reach the server: \(error.underlying.map { "\($0)" } ?? "connection error"); check the host, the port and that the server runs"
        case .poolClosed:
            return "the engine was shut down (DBConnect.close()); a new session creates a new engine"
        default:
            return "could not connect (\(error.code)); check the host, port, TLS settings and credentials"
        }
    }
}

extension PostgresURL {
    /// The direct-connection configuration for one endpoint, with the same TLS rules as the pool's.
    func connectionConfiguration(for endpoint: PostgresEndpoint) throws -> PostgresConnection.Configuration {
        let tls: PostgresConnection.Configuration.TLS
        switch sslMode {
        case "disable": tls = .disable
        case "require", "verify-ca", "verify-full": tls = .require(try NIOSSLContext(configuration: tlsConfiguration))
        default: tls = .prefer(try NIOSSLContext(configuration: tlsConfiguration))
        }
        var configuration = PostgresConnection.Configuration(
            host: endpoint.host, port: endpoint.port,
            username: username, password: password, database: database, tls: tls
        )
        configuration.options.connectTimeout = .nanoseconds(
            connectTimeout.components.seconds * 1_000_000_000 + connectTimeout.components.attoseconds / 1_000_000_000
        )
        if let applicationName {
            configuration.options.additionalStartupParameters.append(("application_name", applicationName))
        }
        return configuration
    }
}
