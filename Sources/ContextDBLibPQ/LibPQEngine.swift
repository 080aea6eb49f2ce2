import CLibPQ
import ContextDB
import ContextDBPostgres
import Logging
import ServiceLifecycle
import Synchronization

/// A `DatabaseEngine` on libpq, PostgreSQL's own client library, with a pool of its own.
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
    public static let idleTimeout = Duration.seconds(60)

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

    private let pool: LibPQPool

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
        self.pool = LibPQPool(keywords: keywords, maximumConnections: self.maximumConnections, leaseTimeout: leaseTimeout)
    }

    /// `"postgresql"`, OpenTelemetry's `db.system.name`.
    public static var systemName: String { "postgresql" }
    /// The database the string names (OpenTelemetry's `db.namespace`).
    public var namespace: String? { conninfo.database }
    /// How many connections sessions hold now.
    public var leasedConnectionCount: Int { pool.leasedCount }
    /// How many connections are open.
    public var openConnectionCount: Int { pool.openCount }

    /// Leases a connection: an idle one, a new one, or the next one released.
    /// - Throws: `DBError.Code.connectionFailed` with libpq's reason when connecting failed, when
    ///   no connection came within ``leaseTimeout``, or after ``shutdown()``.
    public func leaseConnection() async throws -> LibPQConnection {
        try await pool.lease(host: endpoint?.description)
    }

    /// Gives the connection back. A reusable one is reset (`DISCARD ALL`) and pooled; one that
    /// is not, or whose reset fails, is closed.
    public func releaseConnection(_ connection: LibPQConnection, reusable: Bool) async {
        var keep = reusable && connection.isUsable
        if keep {
            keep = (try? await connection.execute("DISCARD ALL", timeout: statementTimeout ?? .seconds(5))) != nil
        }
        await pool.release(connection, reusable: keep)
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

    /// Closes idle connections after ``idleTimeout``, until the task is cancelled or a graceful
    /// shutdown begins (ServiceLifecycle); then shuts down.
    public func run() async {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                for connection in self.pool.takeIdle(olderThan: Self.idleTimeout) { await connection.close() }
            }
        }
        await shutdown()
    }

    /// Closes every connection — those sessions hold too (their transactions roll back) — and
    /// fails the waiting leases.
    public func shutdown() async {
        for connection in pool.shutdown() { await connection.abort() }
    }

    /// Waits until sessions gave every connection back (at most 30 s), then shuts down.
    public func drainAndShutdown() async {
        await PostgresEngine.drain(within: PostgresEngine.drainTimeout, until: { await self.pool.drain() }, then: { await self.shutdown() })
    }
}

/// The engine's connections: idle ones, how many are open, and the leases waiting for one.
final class LibPQPool: Sendable {
    /// What a waiting lease is given: a released connection, or a free slot to open one in.
    private enum Grant {
        case connection(LibPQConnection)
        case slot
    }

    private struct State {
        var idle: [(connection: LibPQConnection, since: ContinuousClock.Instant)] = []
        /// Every open connection, leased or idle, to close at shutdown.
        var all: [ObjectIdentifier: LibPQConnection] = [:]
        /// Open connections and connections being opened.
        var open = 0
        var leased = 0
        var waiters: [Int: CheckedContinuation<Grant?, Never>] = [:]
        var nextWaiter = 0
        var closed = false
        var drainWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let keywords: [(String, String)]
    private let maximumConnections: Int
    private let leaseTimeout: Duration
    private let state = Mutex(State())

    init(keywords: [(String, String)], maximumConnections: Int, leaseTimeout: Duration) {
        self.keywords = keywords
        self.maximumConnections = maximumConnections
        self.leaseTimeout = leaseTimeout
    }

    var leasedCount: Int { state.withLock { $0.leased } }
    var openCount: Int { state.withLock { $0.open } }

    func lease(host: String?) async throws -> LibPQConnection {
        let grant = state.withLock { state -> Grant?? in
            if state.closed { return .some(nil) }
            if let idle = state.idle.popLast() {
                state.leased += 1
                return .connection(idle.connection)
            }
            if state.open < maximumConnections {
                state.open += 1
                state.leased += 1
                return .slot
            }
            return nil  // wait
        }
        switch grant {
        case .some(.some(.connection(let connection))):
            return connection
        case .some(.some(.slot)):
            return try await open(host: host)
        case .some(.none):
            throw DBError(.connectionFailed, "the engine was shut down (DBConnect.close()); a new session creates a new engine", host: host)
        case .none:
            switch await waitForGrant() {
            case .connection(let connection): return connection
            case .slot: return try await open(host: host)
            case nil:
                try Task.checkCancellation()
                if state.withLock({ $0.closed }) {
                    throw DBError(.connectionFailed, "the engine was shut down while this lease waited", host: host)
                }
                throw DBError(
                    .connectionFailed,
                    "no connection was free within the lease timeout (\(leaseTimeout)); all \(maximumConnections) are in use — raise maximumConnections or shorten transactions",
                    host: host
                )
            }
        }
    }

    /// Opens a connection in a slot this lease holds; gives the slot on if it fails.
    private func open(host: String?) async throws -> LibPQConnection {
        do {
            let connection = try await LibPQConnection.connect(keywords)
            let closed = state.withLock { state -> Bool in
                if !state.closed { state.all[ObjectIdentifier(connection)] = connection }
                return state.closed
            }
            if closed {
                await connection.close()
                throw DBError(.connectionFailed, "the engine was shut down while this connection opened", host: host)
            }
            return connection
        } catch {
            giveBackSlot()
            guard var error = error as? DBError else { throw error }
            error.host = error.host ?? host
            throw error
        }
    }

    /// Waits for a released connection or a free slot, at most the lease timeout.
    private func waitForGrant() async -> Grant? {
        let id = state.withLock { state in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        return await withTaskGroup(of: Grant?.self) { group in
            group.addTask {
                await withTaskCancellationHandler {
                    await withCheckedContinuation { continuation in
                        let parked = self.state.withLock { state -> Bool in
                            guard !state.closed, !Task.isCancelled else { return false }
                            state.waiters[id] = continuation
                            return true
                        }
                        if !parked { continuation.resume(returning: nil) }
                    }
                } onCancel: {
                    self.state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
                }
            }
            group.addTask {
                try? await Task.sleep(for: self.leaseTimeout)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            // What was granted after the race was decided goes back.
            for await late in group {
                switch late {
                case .connection(let connection): await release(connection, reusable: true)
                case .slot: giveBackSlot()
                case nil: break
                }
            }
            return first
        }
    }

    /// Gives a slot back that never got a connection (a failed open, a grant that came late).
    private func giveBackSlot() {
        let drained = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.open -= 1
            state.leased -= 1
            var drained: [CheckedContinuation<Void, Never>] = []
            if state.leased == 0 { swap(&drained, &state.drainWaiters) }
            return drained
        }
        for continuation in drained { continuation.resume() }
        handOverCapacity()
    }

    func release(_ connection: LibPQConnection, reusable: Bool) async {
        let (waiter, close, drained) = state.withLock { state -> (CheckedContinuation<Grant?, Never>?, Bool, [CheckedContinuation<Void, Never>]) in
            if reusable, !state.closed, let id = state.waiters.keys.min() {
                return (state.waiters.removeValue(forKey: id), false, [])
            }
            state.leased -= 1
            var drained: [CheckedContinuation<Void, Never>] = []
            if state.leased == 0 { swap(&drained, &state.drainWaiters) }
            if reusable, !state.closed {
                state.idle.append((connection, .now))
                return (nil, false, drained)
            }
            state.open -= 1
            state.all.removeValue(forKey: ObjectIdentifier(connection))
            return (nil, true, drained)
        }
        if let waiter {
            waiter.resume(returning: .connection(connection))
            return
        }
        for continuation in drained { continuation.resume() }
        if close {
            await connection.close()
            handOverCapacity()
        }
    }

    /// A slot freed while leases wait: the first waiter gets it, to open a connection in.
    private func handOverCapacity() {
        let waiter = state.withLock { state -> CheckedContinuation<Grant?, Never>? in
            guard !state.closed, state.open < maximumConnections, let id = state.waiters.keys.min() else { return nil }
            state.open += 1
            state.leased += 1
            return state.waiters.removeValue(forKey: id)
        }
        waiter?.resume(returning: .slot)
    }

    /// Takes the connections idle for `age` or longer out of the pool, to close.
    func takeIdle(olderThan age: Duration) -> [LibPQConnection] {
        state.withLock { state in
            let now = ContinuousClock.now
            let old = state.idle.filter { now - $0.since >= age }.map(\.connection)
            state.idle.removeAll { now - $0.since >= age }
            state.open -= old.count
            for connection in old { state.all.removeValue(forKey: ObjectIdentifier(connection)) }
            return old
        }
    }

    /// Returns once no connection is leased (or the pool shut down).
    func drain() async {
        await withCheckedContinuation { continuation in
            let idle = state.withLock { state -> Bool in
                if state.leased == 0 || state.closed { return true }
                state.drainWaiters.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// Marks the pool closed, fails the waiting leases, and returns every open connection —
    /// leased ones too — to abort.
    func shutdown() -> [LibPQConnection] {
        let (all, waiters, drained) = state.withLock { state in
            state.closed = true
            defer {
                state.idle.removeAll()
                state.all.removeAll()
                state.waiters.removeAll()
                state.drainWaiters.removeAll()
            }
            state.open -= state.idle.count
            return (Array(state.all.values), Array(state.waiters.values), state.drainWaiters)
        }
        for waiter in waiters { waiter.resume(returning: nil) }
        for continuation in drained { continuation.resume() }
        return all
    }
}
