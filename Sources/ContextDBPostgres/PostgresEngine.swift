import ContextDB
import Logging
import PostgresNIO
import Synchronization

/// A ``DatabaseEngine`` on PostgresNIO's `PostgresClient`: its pool, one engine per server.
///
/// The client's `run()` lives as long as the engine and stops in ``shutdown()``.
/// A session's lease outlives one `withConnection {}` call (see `PostgresLease`), and every lease
/// ends with the connection back in the pool — or closed, when it may still be inside a
/// transaction. A connection released clean is first kept for up to a second for the engine's
/// next lease, which then takes it without a pool round trip or a task start; so during that
/// second it is not available to other users of ``client``.
///
/// PostgresNIO's pool retries a failing connection quietly, so a wrong password or an unknown
/// database would make a lease wait forever. A lease that waits longer than a second (or the
/// connect timeout, if shorter) therefore probes the server once with a direct connection; if
/// the probe fails, the lease fails with the server's reason. A lease that gets no connection
/// within ``leaseTimeout`` fails too.
///
/// No statement waits forever: one on a connection the server closed fails at once with
/// ``ContextDB/DBError/Code/connectionLost`` (the connection is discarded), and with a
/// ``statementTimeout`` a statement past its deadline is cancelled, then its connection closed.
/// A connection released clean has its session state reset (``resetsSessionState``) before the
/// next lease gets it.
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
    /// The client-side deadline of every statement (the session's, `BEGIN`, `COMMIT`,
    /// `ROLLBACK`); `nil` for none. At the deadline the engine sends a cancel request
    /// (`pg_cancel_backend`, from a connection of its own), and when the server answers neither
    /// within ``cancelGrace`` — a frozen host — it closes the connection. The statement then fails
    /// with ``ContextDB/DBError/Code/statementTimeout``; when the connection was closed, the
    /// session also treats its transaction as lost. Engines made from a `PostgresClient`
    /// configuration (no URL) send no cancel request: the connection is closed after the grace.
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
    /// How long after a statement's cancel request the engine waits for an answer before it
    /// closes the connection: one second.
    public static let cancelGrace = Duration.seconds(1)

    /// A lease still waiting for its connection, watched by the engine's watchdog.
    private struct Pending: Sendable {
        let lease: PostgresLease
        /// The task waiting in the pool's queue for this lease; `nil` while the engine already
        /// has as many holders as the pool has connections (a released one serves the lease).
        var holder: Task<Void, Never>?
        let started: ContinuousClock.Instant
        var diagnosed = false
    }

    /// A holder task whose connection a session released clean: it keeps the connection out of
    /// the pool for a moment, so the next lease takes it without starting a task.
    private struct Parked: Sendable {
        let connection: PostgresConnection
        let holder: CheckedContinuation<PostgresLease?, Never>
        let since: ContinuousClock.Instant
    }

    private struct Leases: Sendable {
        /// Leases waiting for a connection, by lease.
        var pending: [ObjectIdentifier: Pending] = [:]
        /// Connections handed to sessions and not yet released, by connection.
        var held: [ObjectIdentifier: PostgresLease] = [:]
        /// Holder tasks that have not returned their connection to the pool yet, by task.
        var holders: [ObjectIdentifier: Task<Void, Never>] = [:]
        /// Released connections kept for the next lease, most recent last.
        var parked: [Parked] = []
        /// Set by `shutdown()`: nothing is parked any more.
        var closing = false
        /// Whether the watchdog task runs (only while leases are pending or connections parked).
        var watchdogRunning = false
        /// `drainAndShutdown()` callers waiting for `held` to empty.
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
    }

    /// How long a released connection stays parked for the next lease before it goes back to the pool.
    private static let parkedLifetime = Duration.seconds(1)

    private let runTask: Task<Void, Never>
    private let leases = Mutex(Leases())
    private let connectTimeout: Duration
    /// The pool's size: the engine never has more holder tasks than this.
    private let maximumConnections: Int
    /// A configuration for a direct diagnostic connection with the same TLS rules as the pool's;
    /// `nil` when that cannot be derived (then no probe sends credentials anywhere).
    private let probeConfiguration: PostgresConnection.Configuration?
    private let probe = Mutex<(task: Task<DBError?, Never>, started: ContinuousClock.Instant)?>(nil)
    /// Backend process IDs of the pool's connections, for cancel requests (learnt only when a
    /// statement timeout is set). An entry goes when its connection closes.
    private let backendPIDs = Mutex<[ObjectIdentifier: Int32]>([:])
    /// Connections a statement found lost (a FATAL error may arrive before the channel closes),
    /// until they close.
    private let condemned = Mutex<Set<ObjectIdentifier>>([])
    /// The engine's own connection for cancel requests, opened on the first one and kept;
    /// `closed` once the engine shut down.
    private let canceller = Mutex<(connecting: Task<PostgresConnection?, Never>?, closed: Bool)>((nil, false))

    /// Creates an engine for a server and starts its pool. Connects nothing yet.
    /// - Parameters:
    ///   - configuration: PostgresNIO's client configuration (host, credentials, TLS, pool size).
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of every statement (see ``statementTimeout``). Default none.
    ///   - resetsSessionState: Reset a released connection's session state (see ``resetsSessionState``). Default `true`.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - logger: Where the engine logs. Default: label `ContextDB.Postgres`.
    public convenience init(
        configuration: PostgresClient.Configuration,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
        capturesCommitLSN: Bool = false,
        logger: Logger = Logger(label: "ContextDB.Postgres")
    ) {
        self.init(
            configuration: configuration, probe: nil, leaseTimeout: leaseTimeout, statementTimeout: statementTimeout,
            resetsSessionState: resetsSessionState, capturesCommitLSN: capturesCommitLSN, logger: logger
        )
    }

    /// Creates an engine for one server of a URI and starts its pool. Connects nothing yet.
    /// - Parameters:
    ///   - url: The parsed URI (credentials, database, TLS, timeouts).
    ///   - endpoint: Which server; default the URI's first.
    ///   - maximumConnections: The pool's size. Default 20.
    ///   - leaseTimeout: The longest a lease may wait for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of every statement (see ``statementTimeout``). Default none.
    ///   - resetsSessionState: Reset a released connection's session state (see ``resetsSessionState``). Default `true`.
    ///   - capturesCommitLSN: Record the WAL position of committed writes (see ``capturesCommitLSN``).
    ///   - logger: Where the engine logs.
    /// - Throws: ``DBError/Code/invalidConfiguration`` when the TLS settings cannot be built.
    public convenience init(
        url: PostgresURL,
        endpoint: PostgresEndpoint? = nil,
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
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
            configuration: configuration, probe: probe, leaseTimeout: leaseTimeout, statementTimeout: statementTimeout,
            resetsSessionState: resetsSessionState, capturesCommitLSN: capturesCommitLSN, logger: logger
        )
    }

    private init(
        configuration: PostgresClient.Configuration,
        probe: PostgresConnection.Configuration?,
        leaseTimeout: Duration,
        statementTimeout: Duration?,
        resetsSessionState: Bool,
        capturesCommitLSN: Bool,
        logger: Logger
    ) {
        self.capturesCommitLSN = capturesCommitLSN
        self.statementTimeout = statementTimeout
        self.resetsSessionState = resetsSessionState
        self.endpoint = PostgresEndpoint(host: configuration.host ?? "localhost", port: configuration.port ?? 5432)
        var logger = logger
        logger[metadataKey: "db.host"] = "\(endpoint)"
        self.logger = logger
        self.leaseTimeout = leaseTimeout
        self.connectTimeout = configuration.options.connectTimeout
        self.maximumConnections = max(1, configuration.options.maximumConnections)
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
        enum Start {
            case parked(Parked)
            case pending(startWatchdog: Bool)
        }
        while true {
            let start = leases.withLock { state -> Start in
                if let parked = state.parked.popLast() {
                    if !parked.connection.isClosed {
                        lease.markHandedOut()
                        state.held[ObjectIdentifier(parked.connection)] = lease
                    }
                    return .parked(parked)
                }
                // Only as many holders as the pool has connections: more would queue in the pool
                // only to be cancelled when a released connection serves their lease.
                let holder = state.holders.count < maximumConnections ? startHolder(for: lease, &state) : nil
                state.pending[id] = Pending(lease: lease, holder: holder, started: .now)
                return .pending(startWatchdog: needsWatchdog(&state))
            }
            switch start {
            case .parked(let parked) where parked.connection.isClosed:
                parked.holder.resume(returning: nil)  // the server closed it: back to the pool, which drops it
                continue
            case .parked(let parked):
                // Its holder task serves this lease now; nothing to wait for.
                parked.holder.resume(returning: lease)
                return parked.connection
            case .pending(let startWatchdog):
                if startWatchdog {
                    Task.detached { [self] in await watch() }
                }
            }
            break
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
            // A connection another holder handed to this lease went back with the abandon.
            _ = removeHeld { state in
                state.pending[id] = nil
                return state.held.first(where: { $0.value === lease })?.key
            }
            if error is DBError || error is CancellationError { throw error }
            throw DBError(
                .connectionFailed, Self.explain(error),
                host: endpoint.description, underlying: error
            )
        }
    }

    /// Starts the task that gets a connection from the pool for `lease` and holds it (see
    /// `hold`). Called under the lock, so the holder cannot remove itself before it is recorded.
    private func startHolder(for lease: PostgresLease, _ state: inout Leases) -> Task<Void, Never> {
        let id = ObjectIdentifier(lease)
        let holder = Task.detached { [client, self] in
            do {
                try await client.withConnection { connection in
                    await learnBackendPID(of: connection)
                    guard lease.deliver(connection) else { return }
                    await hold(connection, lease)
                }
            } catch {
                lease.holderFailed(error)
            }
            self.holderFinished(id)
        }
        state.holders[id] = holder
        return holder
    }

    /// The holder's side of one or more leases of `connection`: waits for the release, then
    /// parks the connection for the next lease while it is clean, until it is not taken in time.
    private func hold(_ connection: PostgresConnection, _ first: PostgresLease) async {
        var lease = first
        while true {
            guard await lease.waitForRelease(), await reset(connection) else {
                // Possibly inside a transaction, or not reset: never let the next borrower inherit it.
                try? await connection.close()
                return
            }
            let next = await withCheckedContinuation { (continuation: CheckedContinuation<PostgresLease?, Never>) in
                enum Next {
                    case giveBack
                    /// Serve a lease that waits in the pool's queue, where a parked connection
                    /// would never go: first come, first served, so no lease starves.
                    case serve(PostgresLease, otherHolder: Task<Void, Never>?)
                    case parked(startWatchdog: Bool)
                }
                let next = leases.withLock { state -> Next in
                    guard !state.closing, !connection.isClosed else { return .giveBack }
                    while let (id, pending) = state.pending.min(by: { $0.value.started < $1.value.started }) {
                        state.pending[id] = nil
                        if pending.lease.deliver(connection) {
                            state.held[ObjectIdentifier(connection)] = pending.lease
                            return .serve(pending.lease, otherHolder: pending.holder)
                        }
                    }
                    state.parked.append(Parked(connection: connection, holder: continuation, since: .now))
                    return .parked(startWatchdog: needsWatchdog(&state))
                }
                switch next {
                case .giveBack:
                    continuation.resume(returning: nil)
                case .serve(let lease, let otherHolder):
                    otherHolder?.cancel()  // its own wait in the pool's queue is not needed any more
                    continuation.resume(returning: lease)
                case .parked(let startWatchdog):
                    if startWatchdog { Task.detached { [self] in await watch() } }
                }
            }
            guard let next else { return }
            lease = next
        }
    }

    /// Marks the watchdog as running; `true` when the caller must start it.
    private func needsWatchdog(_ state: inout Leases) -> Bool {
        defer { state.watchdogRunning = true }
        return !state.watchdogRunning
    }

    /// Gives the connection back without waiting for the pool to take it: the lease's holder
    /// task parks it for the next lease, returns it to the pool, or closes it when `reusable`
    /// is false.
    public func releaseConnection(_ connection: PostgresConnection, reusable: Bool) async {
        removeHeld { _ in ObjectIdentifier(connection) }?.release(reusable: reusable && isConnectionUsable(connection))
    }

    /// Removes the held lease whose connection `find` names (under the lock) and wakes
    /// `drainAndShutdown()` when no session holds a connection any more.
    private func removeHeld(_ find: (inout Leases) -> ObjectIdentifier?) -> PostgresLease? {
        let (lease, waiters) = leases.withLock { state -> (PostgresLease?, [CheckedContinuation<Void, Never>]) in
            guard let key = find(&state), let lease = state.held.removeValue(forKey: key) else { return (nil, []) }
            guard state.held.isEmpty else { return (lease, []) }
            defer { state.idleWaiters.removeAll() }
            return (lease, state.idleWaiters)
        }
        for waiter in waiters { waiter.resume() }
        return lease
    }

    /// A holder returned its connection: a lease waiting without a holder gets one now.
    private func holderFinished(_ id: ObjectIdentifier) {
        leases.withLock { state in
            state.holders[id] = nil
            guard !state.closing, state.holders.count < maximumConnections else { return }
            let waiting = state.pending.lazy.filter { $0.value.holder == nil }
            guard let (next, pending) = waiting.min(by: { $0.value.started < $1.value.started }) else { return }
            let holder = startHolder(for: pending.lease, &state)
            state.pending[next]?.holder = holder
        }
    }

    /// Runs while leases wait or connections are parked: a lease that waited `diagnoseAfter`
    /// gets the server probed once (a wrong password makes the pool retry forever), one that
    /// waited ``leaseTimeout`` fails, a connection parked for `parkedLifetime` goes back to the
    /// pool. One task per engine, not one per lease; it ends when there is nothing to watch.
    private func watch() async {
        let diagnoseAfter = min(.seconds(1), connectTimeout)
        let tick = min(.milliseconds(100), diagnoseAfter / 4)
        while true {
            try? await Task.sleep(for: tick)
            let now = ContinuousClock.now
            let (expired, toDiagnose, retired, done) = leases.withLock {
                state -> ([Pending], [Pending], [Parked], Bool) in
                let retired = state.parked.filter { $0.since.duration(to: now) >= Self.parkedLifetime }
                if !retired.isEmpty {
                    state.parked.removeAll { $0.since.duration(to: now) >= Self.parkedLifetime }
                }
                if state.pending.isEmpty && state.parked.isEmpty {
                    state.watchdogRunning = false
                    return ([], [], retired, true)
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
                return (expired, toDiagnose, retired, false)
            }
            for parked in retired { parked.holder.resume(returning: nil) }
            if done { return }
            if !expired.isEmpty {
                let timeout = DBError(
                    .connectionFailed,
                    "no connection became free within \(leaseTimeout); the pool may be too small for the load, or sessions are held too long",
                    host: endpoint.description
                )
                for pending in expired where pending.lease.abandon(timeout) { pending.holder?.cancel() }
            }
            if !toDiagnose.isEmpty {
                Task.detached { [self] in
                    guard let failure = await diagnose() else { return }
                    for pending in toDiagnose where pending.lease.abandon(failure) { pending.holder?.cancel() }
                }
            }
        }
    }

    /// Runs a transaction control statement, bounded by ``statementTimeout``.
    ///
    /// - Throws: For `COMMIT`, ``ContextDB/DBError/Code/commitFailed`` when the server answers
    ///   with the tag `ROLLBACK` (it rolled back an aborted transaction); when the connection is
    ///   lost while `COMMIT` runs, ``ContextDB/DBError/Code/commitOutcomeUnknown``. See
    ///   ``query(_:on:logger:)`` for the rest.
    public func execute(_ statement: DBControlStatement, on connection: PostgresConnection) async throws {
        guard statement == .commit else {
            _ = try await query(PostgresQuery(unsafeSQL: statement.sql), on: connection, logger: logger)
            return
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
        guard wrote else { return }
        // After COMMIT: the commit record is before this position, so a replica that replayed
        // up to it sees the transaction.
        do {
            let text = try await query(Self.positionQuery, on: connection, logger: logger).first?.decode(String.self)
            if let text, let position = PostgresLSN(text) {
                DBContext.current?.advanceConsistencyToken(to: position)
            }
        } catch {
            logger.warning("committed, but could not read the WAL position for read-your-own-writes", metadata: ["error": "\(String(reflecting: error))"])
        }
    }

    /// Runs one statement on a connection this engine leased and collects its rows, bounded by
    /// ``statementTimeout`` and never waiting on a connection the server closed.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - connection: A connection of this engine.
    ///   - logger: Where PostgresNIO logs the statement.
    /// - Returns: The rows and the command tag (`result.metadata.command`).
    /// - Throws: ``ContextDB/DBError/Code/connectionLost`` when the server closed the connection
    ///   (with its message and SQLSTATE when it sent one: 57P01, 25P03, 40001…),
    ///   ``ContextDB/DBError/Code/statementTimeout`` when the deadline cancelled the statement,
    ///   else PostgresNIO's `PSQLError`.
    public func query(_ query: PostgresQuery, on connection: PostgresConnection, logger: Logger) async throws -> PostgresQueryResult {
        var cancel: (@Sendable () async -> Bool)?
        if statementTimeout != nil, probeConfiguration != nil {
            let id = ObjectIdentifier(connection)
            cancel = { [self] in await cancelStatement(on: id) }
        }
        do {
            return try await connection.guardedQuery(
                query, host: endpoint.description, logger: logger, timeout: statementTimeout, cancel: cancel
            )
        } catch let error as DBError where error.code == .connectionLost || error.underlying is ClosedAtDeadline {
            condemn(connection)
            throw error
        }
    }

    /// Whether the connection can still run statements: not closed, and no statement found it lost.
    public func isConnectionUsable(_ connection: PostgresConnection) -> Bool {
        !connection.isClosed && !condemned.withLock { $0.contains(ObjectIdentifier(connection)) }
    }

    /// Marks a connection lost and closes it; the mark goes when it has closed.
    private func condemn(_ connection: PostgresConnection) {
        let id = ObjectIdentifier(connection)
        guard condemned.withLock({ $0.insert(id).inserted }) else { return }
        connection.closeFuture.whenComplete { [self] _ in
            condemned.withLock { _ = $0.remove(id) }
        }
        let closed: EventLoopFuture<Void> = connection.close()
        _ = closed
    }

    private static let commitQuery: PostgresQuery = "COMMIT"
    private static let wroteQuery: PostgresQuery = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
    private static let positionQuery: PostgresQuery = "SELECT pg_current_wal_lsn()::text"

    /// Waits until no session holds a connection of this engine, then shuts it down — for a
    /// host that left the cluster or a demoted primary.
    public func drainAndShutdown() async {
        await withCheckedContinuation { continuation in
            let idle = leases.withLock { state in
                if state.held.isEmpty { return true }
                state.idleWaiters.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
        await shutdown()
    }

    public func shutdown() async {
        // Connections still held by sessions are closed, not pooled (they may be inside a
        // transaction); their holders finish before the pool stops. Leases still waiting fail
        // when it stops.
        let (held, parked, holders, waiters) = leases.withLock { state in
            defer {
                state.closing = true
                state.held.removeAll()
                state.parked.removeAll()
                state.idleWaiters.removeAll()
            }
            let pendingHolders = Set(state.pending.keys)
            return (
                Array(state.held.values), state.parked,
                state.holders.filter { !pendingHolders.contains($0.key) }.map(\.value), state.idleWaiters
            )
        }
        for lease in held { lease.release(reusable: false) }
        for connection in parked { connection.holder.resume(returning: nil) }
        for waiter in waiters { waiter.resume() }
        for holder in holders { await holder.value }
        let cancelling = canceller.withLock { state in
            state.closed = true
            return state.connecting
        }
        if let control = await cancelling?.value { try? await control.close() }
        runTask.cancel()
        await runTask.value
        for holder in leases.withLock({ Array($0.holders.values) }) { await holder.value }
    }

    // MARK: - Session state and cancel requests

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

    /// The shortest bound of the reset: at least this, or the statement timeout when longer.
    private static let resetTimeout = Duration.seconds(5)

    /// Resets a connection released clean (see ``resetsSessionState``); `false` when it must be closed.
    private func reset(_ connection: PostgresConnection) async -> Bool {
        guard resetsSessionState else { return !connection.isClosed }
        do {
            _ = try await connection.guardedQuery(
                Self.resetQuery, host: endpoint.description, logger: logger, timeout: max(statementTimeout ?? Self.resetTimeout, Self.resetTimeout)
            )
            return true
        } catch {
            logger.debug("could not reset a released connection; closing it", metadata: ["error": "\(String(reflecting: error))"])
            return false
        }
    }

    /// Learns the backend process ID of a pool connection once, when statements have a
    /// deadline and the engine can send cancel requests, so that a cancel can name it.
    private func learnBackendPID(of connection: PostgresConnection) async {
        guard let statementTimeout, probeConfiguration != nil else { return }
        let id = ObjectIdentifier(connection)
        guard backendPIDs.withLock({ $0[id] }) == nil else { return }
        guard let pid = try? await connection.guardedQuery(
            Self.backendPIDQuery, host: endpoint.description, logger: logger, timeout: statementTimeout
        ).first?.decode(Int32.self) else { return }
        backendPIDs.withLock { $0[id] = pid }
        connection.closeFuture.whenComplete { [self] _ in
            backendPIDs.withLock { _ = $0.removeValue(forKey: id) }
        }
    }

    private static let backendPIDQuery: PostgresQuery = "SELECT pg_backend_pid()"

    /// Asks the server to cancel what the connection's backend runs (`pg_cancel_backend`, on
    /// the engine's own cancel connection, opened on first use and kept; PostgreSQL docs, "Server
    /// Signaling Functions"). Connect and query are each bounded by ``cancelGrace``. Returns
    /// whether the server confirmed the request; when it did not, the caller closes the
    /// statement's connection rather than risk a late cancel hitting its next statement.
    ///
    /// > Note: The cancel names the backend process, so it needs a direct session to the
    /// > server; behind a pooler in transaction mode (PgBouncer) it may reach another client's
    /// > backend. Leave ``statementTimeout`` off there, or use the pooler's own `query_timeout`.
    private func cancelStatement(on connection: ObjectIdentifier) async -> Bool {
        guard let pid = backendPIDs.withLock({ $0[connection] }) else { return false }
        logger.info("statement timeout: sending a cancel request", metadata: ["db.backend_pid": "\(pid)"])
        guard let control = await cancelConnection() else { return false }
        do {
            return try await control.guardedQuery(
                "SELECT pg_cancel_backend(\(pid))", host: endpoint.description, logger: logger,
                timeout: Self.cancelGrace, grace: .zero
            ).first?.decode(Bool.self) ?? false
        } catch {
            logger.debug("the cancel request failed", metadata: ["error": "\(String(reflecting: error))"])
            return false
        }
    }

    /// The engine's cancel connection, opened when missing or closed; `nil` when it cannot be had.
    private func cancelConnection() async -> PostgresConnection? {
        guard var configuration = probeConfiguration else { return nil }
        configuration.options.connectTimeout = TimeAmount(Self.cancelGrace)  // a frozen host never delays a statement longer
        let cancelConfiguration = configuration
        for _ in 0..<2 {  // a kept connection the server closed since: connect once more
            let task = canceller.withLock { state -> Task<PostgresConnection?, Never>? in
                guard !state.closed else { return nil }
                if let connecting = state.connecting { return connecting }
                // One connect at a time, shared by every concurrent cancel.
                let connecting = Task { [logger] in
                    try? await PostgresConnection.connect(configuration: cancelConfiguration, id: 0, logger: logger)
                }
                state.connecting = connecting
                return connecting
            }
            guard let task else { return nil }
            let connection = await task.value
            if let connection, !connection.isClosed {
                if canceller.withLock({ $0.closed }) {
                    try? await connection.close()  // opened while the engine shut down
                    return nil
                }
                return connection
            }
            canceller.withLock { state in
                if state.connecting == task { state.connecting = nil }
            }
            guard connection != nil else { return nil }  // the connect failed: no second try now
        }
        return nil
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
