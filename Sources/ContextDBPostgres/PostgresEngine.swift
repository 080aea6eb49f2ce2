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

    /// A lease still waiting for its connection, watched by the engine's watchdog.
    private struct Pending: Sendable {
        let lease: PostgresLease
        let holder: Task<Void, Never>
        let started: ContinuousClock.Instant
        var diagnosed = false
    }

    private struct Leases: Sendable {
        /// Leases waiting for a connection, by lease.
        var pending: [ObjectIdentifier: Pending] = [:]
        /// Connections handed to sessions and not yet released, by connection.
        var held: [ObjectIdentifier: PostgresLease] = [:]
        /// Holder tasks that have not returned their connection to the pool yet, by lease.
        var holders: [ObjectIdentifier: Task<Void, Never>] = [:]
        /// Whether the watchdog task runs (it runs only while leases are pending).
        var watchdogRunning = false
        /// `drainAndShutdown()` callers waiting for `holders` to empty.
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let runTask: Task<Void, Never>
    private let leases = Mutex(Leases())
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
    public var leasedConnectionCount: Int { leases.withLock { $0.held.count } }

    // MARK: - Leasing

    public func leaseConnection() async throws -> PostgresConnection {
        let lease = PostgresLease()
        let id = ObjectIdentifier(lease)
        let startWatchdog = leases.withLock { state -> Bool in
            // Made under the lock, so the holder cannot remove itself before it is recorded.
            let holder = Task.detached { [client, self] in
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
                self.holderFinished(id)
            }
            state.holders[id] = holder
            state.pending[id] = Pending(lease: lease, holder: holder, started: .now)
            defer { state.watchdogRunning = true }
            return !state.watchdogRunning
        }
        if startWatchdog {
            Task.detached { [self] in await watch() }
        }
        do {
            let connection = try await withTaskCancellationHandler {
                try await lease.connection()
            } onCancel: {
                if lease.abandon(CancellationError()) { leases.withLock { $0.holders[id] }?.cancel() }
            }
            leases.withLock { state in
                state.pending[id] = nil
                state.held[ObjectIdentifier(connection)] = lease
            }
            return connection
        } catch {
            leases.withLock { $0.pending[id] = nil }
            if error is DBError || error is CancellationError { throw error }
            throw DBError(
                .connectionFailed, Self.explain(error),
                host: endpoint.description, underlying: error
            )
        }
    }

    /// Gives the connection back without waiting for the pool to take it: the lease's holder
    /// task returns it (or closes it, when `reusable` is false) on its own.
    public func releaseConnection(_ connection: PostgresConnection, reusable: Bool) async {
        leases.withLock { $0.held.removeValue(forKey: ObjectIdentifier(connection)) }?.release(reusable: reusable)
    }

    private func holderFinished(_ id: ObjectIdentifier) {
        let waiters = leases.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.holders[id] = nil
            guard state.holders.isEmpty else { return [] }
            defer { state.idleWaiters.removeAll() }
            return state.idleWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Runs while leases wait: a lease that waited `diagnoseAfter` gets the server probed once
    /// (a wrong password makes the pool retry forever), one that waited ``leaseTimeout`` fails.
    /// One task per engine, not one per lease; it ends when nothing is pending.
    private func watch() async {
        let diagnoseAfter = min(.seconds(1), connectTimeout)
        let tick = min(.milliseconds(100), diagnoseAfter / 4)
        while true {
            try? await Task.sleep(for: tick)
            let now = ContinuousClock.now
            let (expired, toDiagnose, done) = leases.withLock { state -> ([Pending], [Pending], Bool) in
                if state.pending.isEmpty {
                    state.watchdogRunning = false
                    return ([], [], true)
                }
                var expired: [Pending] = []
                var toDiagnose: [Pending] = []
                for (id, pending) in state.pending {
                    let waited = pending.started.duration(to: now)
                    if waited >= leaseTimeout {
                        expired.append(pending)
                    } else if waited >= diagnoseAfter, !pending.diagnosed {
                        state.pending[id]?.diagnosed = true
                        toDiagnose.append(pending)
                    }
                }
                return (expired, toDiagnose, false)
            }
            if done { return }
            if !expired.isEmpty {
                let timeout = DBError(
                    .connectionFailed,
                    "no connection became free within \(leaseTimeout); the pool may be too small for the load, or sessions are held too long",
                    host: endpoint.description
                )
                for pending in expired where pending.lease.abandon(timeout) { pending.holder.cancel() }
            }
            if !toDiagnose.isEmpty {
                Task.detached { [self] in
                    guard let failure = await diagnose() else { return }
                    for pending in toDiagnose where pending.lease.abandon(failure) { pending.holder.cancel() }
                }
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

    /// Waits until every connection of this engine is back in its pool (no session holds
    /// one), then shuts it down — for a host that left the cluster or a demoted primary.
    public func drainAndShutdown() async {
        await withCheckedContinuation { continuation in
            let idle = leases.withLock { state in
                if state.holders.isEmpty { return true }
                state.idleWaiters.append(continuation)
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
        // Connections still held by sessions are closed, not pooled (they may be inside a
        // transaction); their holders finish before the pool stops. Leases still waiting fail
        // when it stops.
        let (held, heldHolders) = leases.withLock { state in
            defer { state.held.removeAll() }
            let held = Array(state.held.values)
            return (held, held.compactMap { state.holders[ObjectIdentifier($0)] })
        }
        for lease in held { lease.release(reusable: false) }
        for holder in heldHolders { await holder.value }
        runTask.cancel()
        await runTask.value
        for holder in leases.withLock({ Array($0.holders.values) }) { await holder.value }
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
