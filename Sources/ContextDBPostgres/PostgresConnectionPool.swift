import ContextDB
import CoreMetrics
import Logging
import NIOCore
import PostgresNIO
import Synchronization

/// What a pool does with its connections, for the client library behind them: PostgresNIO's
/// (``PostgresEngine``) or libpq's.
package struct PoolDriver<Connection: AnyObject & Sendable>: Sendable {
    /// Opens a connection (`id` numbers them, for logs). A `DBError` it throws is the
    /// connect's failure as is; another error is explained with `explain`.
    package var open: @Sendable (_ id: Int) async throws -> Connection
    /// Runs once on a new connection before it serves a lease.
    package var prepare: @Sendable (Connection) async -> Void = { _ in }
    /// Calls back once the connection closed (the server or the network closed it); a
    /// driver that cannot tell passes nothing, and a dead idle connection is found on use.
    package var onClose: @Sendable (Connection, @escaping @Sendable () -> Void) -> Void = { _, _ in }
    /// Whether the connection is closed or broken.
    package var isClosed: @Sendable (Connection) -> Bool
    /// Closes the connection without waiting for it.
    package var closeQuietly: @Sendable (Connection) -> Void
    /// Resets a connection released clean, then calls back with whether that succeeded;
    /// `nil` to pool released connections as they are.
    package var reset: (@Sendable (Connection, @escaping @Sendable (Bool) -> Void) -> Void)?
    /// A sentence for a failed connect's error.
    package var explain: @Sendable (any Error) -> String

    package init(
        open: @escaping @Sendable (_ id: Int) async throws -> Connection,
        isClosed: @escaping @Sendable (Connection) -> Bool,
        closeQuietly: @escaping @Sendable (Connection) -> Void,
        reset: (@Sendable (Connection, @escaping @Sendable (Bool) -> Void) -> Void)?,
        explain: @escaping @Sendable (any Error) -> String
    ) {
        self.open = open
        self.isClosed = isClosed
        self.closeQuietly = closeQuietly
        self.reset = reset
        self.explain = explain
    }
}

/// The connections of one engine: opened by its ``PoolDriver``, leased for a whole session,
/// reset on the way back, closed when idle too long.
///
/// The bookkeeping is a `LeaseStateMachine` behind one lock; this type runs what it answers
/// after the lock is released. A lease served by an idle connection is one lock; one that waits
/// is a continuation, no task. Connects and the timer are child tasks of ``run()`` (which the
/// engine's connect runs), and end with ``shutdown()``; a reset is the driver's callback chain.
package final class PostgresConnectionPool<Connection: AnyObject & Sendable>: Sendable {
    typealias Waiter = CheckedContinuation<Connection, any Error>
    typealias Machine = LeaseStateMachine<Connection, Waiter, ContinuousClock.Instant>

    private struct State {
        var machine: Machine
        var nextID = 0
        /// `drain()` callers waiting for no connection to be leased.
        var drainWaiters: [CheckedContinuation<Void, Never>] = []
        /// Whether `run()` started: until then connects and the timer wait in `jobs`.
        var running = false
        /// The gauges' values as last published: only a change is published again.
        var published = (idle: -1, used: -1, pending: -1)
    }

    /// How long an unused connection stays open: one minute.
    package static var idleTimeout: Duration { .seconds(60) }
    /// How long after a failed connect no new one starts: one second.
    static var connectRetryDelay: Duration { .seconds(1) }
    /// How long a lease waits for `run()` to start before the pool warns that nothing may be
    /// running it: one second. It fails with `DBError.Code.notRunning` at the lease timeout.
    static var runStartGrace: Duration { .seconds(1) }

    private let state: Mutex<State>
    private let driver: PoolDriver<Connection>
    private let host: String
    private let logger: Logger
    private let leaseTimeout: Duration
    /// The pool's gauges and timeout counter, published after every change.
    private let metrics: PostgresPoolMetrics
    private let jobs: AsyncStream<@Sendable () async -> Void>.Continuation
    private let pendingJobs: AsyncStream<@Sendable () async -> Void>

    /// - Parameters:
    ///   - driver: How to open, reset and close connections.
    ///   - host: The server, for errors and logs.
    ///   - maximumConnections: The most connections open at once.
    ///   - leaseTimeout: The longest a lease waits.
    ///   - logger: Where the pool logs.
    ///   - metrics: Where the pool's gauges and timeouts go.
    package init(
        driver: PoolDriver<Connection>,
        host: String,
        maximumConnections: Int,
        leaseTimeout: Duration,
        logger: Logger,
        metrics: PostgresPoolMetrics
    ) {
        self.metrics = metrics
        self.driver = driver
        self.host = host
        self.logger = logger
        self.leaseTimeout = leaseTimeout
        self.state = Mutex(State(machine: Machine(configuration: .init(
            maximumConnections: max(1, maximumConnections), leaseTimeout: leaseTimeout, idleTimeout: Self.idleTimeout,
            resetsOnRelease: driver.reset != nil, connectRetryDelay: Self.connectRetryDelay
        ))))
        (pendingJobs, jobs) = AsyncStream.makeStream(of: (@Sendable () async -> Void).self)
    }

    /// Runs the connects and the timer as child tasks until ``shutdown()`` or until the task is
    /// cancelled (which shuts the pool down). Called once; a second call returns at once.
    package func run() async {
        let first = state.withLock { state in
            defer { state.running = true }
            return !state.running
        }
        guard first else {
            logger.warning("the connection pool's run() was called twice; the second call returns at once")
            return
        }
        await withDiscardingTaskGroup { group in
            for await job in pendingJobs {
                group.addTask { await job() }
            }
            group.cancelAll()  // a sleeping timer and connects under way end now
        }
        await shutdown()
    }

    /// Runs `body` on the state under its lock, then publishes the pool's gauges.
    private func withMachine<R>(_ body: (inout State) throws -> R) rethrows -> R {
        try state.withLock { state in
            let result = try body(&state)
            let now = (idle: state.machine.idleCount, used: state.machine.leasedCount, pending: state.machine.pendingCount)
            if now != state.published {
                // Under the lock, so the gauges end on the latest values whatever the order of
                // the threads; only what changed, so most leases publish one value or none.
                metrics.publish(
                    idle: now.idle != state.published.idle ? now.idle : nil, used: now.used != state.published.used ? now.used : nil,
                    pending: now.pending != state.published.pending ? now.pending : nil
                )
                state.published = now
            }
            return result
        }
    }

    /// Connections sessions hold now.
    package var leasedCount: Int { state.withLock { $0.machine.leasedCount } }
    /// Connections open or being opened.
    package var connectionCount: Int { state.withLock { $0.machine.connectionCount } }

    // MARK: - Leasing

    /// A connection for a session: an idle one, a new one, or the next one released.
    /// - Throws: `DBError.Code.connectionFailed` with the server's reason when
    ///   connecting failed, when none came within the lease timeout, or after shutdown;
    ///   `CancellationError` when the task was cancelled while waiting.
    package func lease() async throws -> Connection {
        let arrived = ContinuousClock.now  // one lease timeout, whatever waited for run() first
        if !state.withLock({ $0.running || $0.machine.isShutDown }) { try await waitUntilRunning(since: arrived) }
        let (first, id) = withMachine { state in
            state.nextID &+= 1
            return (state.machine.lease(now: .now), state.nextID)
        }
        switch first {
        case .handOut(let connection): return connection
        case .fail(let failure): throw error(for: failure)
        case .wait: break
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (waiter: Waiter) in
                let action = withMachine { $0.machine.wait(id: id, waiter: waiter, now: .now, arrived: arrived) }
                switch action {
                case .handOut(let connection):
                    waiter.resume(returning: connection)
                case .fail(let failure):
                    waiter.resume(throwing: error(for: failure))
                case .queued(let connect, let startTimer):
                    if connect { startConnect() }
                    if startTimer { self.startTimer() }
                    // A cancel that came before the waiter was queued found nothing to remove.
                    if Task.isCancelled { cancelWaiter(id) }
                }
            }
        } onCancel: {
            cancelWaiter(id)
        }
    }

    /// Waits for `run()` to start, at most the lease timeout: a lease may come a moment before
    /// the connect's service runs, and on a busy machine that moment can be long. Logs a
    /// warning after ``runStartGrace``, then fails with `DBError.Code.notRunning` at the lease
    /// timeout. Polls: only a lease in that moment, or on an engine nothing runs, waits here.
    private func waitUntilRunning(since started: ContinuousClock.Instant) async throws {
        var warned = false
        var pause = Duration.milliseconds(1)
        while !state.withLock({ $0.running || $0.machine.isShutDown }) {
            let waited = started.duration(to: .now)
            guard waited < leaseTimeout else {
                throw DBError(
                    .notRunning,
                    "the engine is not running, so it cannot open connections: run its DBConnect (a ServiceLifecycle Service: add it to your ServiceGroup or Hummingbird's Application(services:)), or call run() on a PostgresEngine you made yourself",
                    host: host
                )
            }
            if !warned, waited >= Self.runStartGrace {
                warned = true
                logger.warning("a lease is waiting for the engine to run; is its DBConnect running as a service?", metadata: ["db.host": "\(host)"])
            }
            try await Task.sleep(for: pause)
            pause = min(pause * 2, .milliseconds(50))
        }
    }

    private func cancelWaiter(_ id: Int) {
        withMachine { $0.machine.cancel(id: id) }?.resume(throwing: CancellationError())
    }

    /// Takes a leased connection back: reset and pooled when `reusable`, else closed.
    package func release(_ connection: Connection, reusable: Bool) {
        let (action, drained) = withMachine { state -> (Machine.ReturnAction, [CheckedContinuation<Void, Never>]) in
            let action = state.machine.release(connection, reusable: reusable, now: .now)
            guard state.machine.leasedCount == 0, !state.drainWaiters.isEmpty else { return (action, []) }
            defer { state.drainWaiters.removeAll() }
            return (action, state.drainWaiters)
        }
        run(action)
        for waiter in drained { waiter.resume() }
    }

    /// Waits until no session holds a connection.
    package func drain() async {
        await withCheckedContinuation { continuation in
            let idle = withMachine { state in
                if state.machine.leasedCount == 0 { return true }
                state.drainWaiters.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// Fails every waiter, closes every connection (leased ones too: they may be inside a
    /// transaction, which closing rolls back) and ends the connects and the timer.
    package func shutdown() async {
        let (action, drained) = withMachine { state -> (Machine.ShutdownAction, [CheckedContinuation<Void, Never>]) in
            defer { state.drainWaiters.removeAll() }
            return (state.machine.shutdown(), state.drainWaiters)
        }
        let failure = error(for: .shutdown)
        for waiter in action.fail { waiter.resume(throwing: failure) }
        for connection in action.close { driver.closeQuietly(connection) }
        for waiter in drained { waiter.resume() }
        jobs.finish()  // run() returns once its connects and timer have ended
    }

    // MARK: - Running the machine's answers

    private func run(_ action: Machine.ReturnAction) {
        switch action {
        case .none(let startTimer):
            if startTimer { self.startTimer() }
        case .handOut(let waiter, let connection):
            waiter.resume(returning: connection)
        case .reset(let connection):
            reset(connection)
        case .close(let connection, let connect):
            driver.closeQuietly(connection)
            if connect { startConnect() }
        }
    }

    private func startConnect() {
        jobs.yield { [self] in await connect() }
    }

    private func startTimer() {
        jobs.yield { [self] in await runTimer() }
    }

    private func connect() async {
        let id = state.withLock { state in
            state.nextID &+= 1
            return state.nextID
        }
        do {
            let connection = try await driver.open(id)
            await driver.prepare(connection)
            driver.onClose(connection) { [self] in
                withMachine { $0.machine.closed(connection) }
            }
            let (action, more) = withMachine { state in
                let action = state.machine.connected(connection, now: .now)
                return (action, state.machine.startConnects(now: .now))
            }
            run(action)
            for _ in 0..<more { startConnect() }
            // Closed while it was being set up: its close callback found nothing to remove.
            if driver.isClosed(connection) { withMachine { $0.machine.closed(connection) } }
        } catch {
            var failure = (error as? DBError) ?? DBError(.connectionFailed, driver.explain(error), host: host, underlying: error)
            failure.host = failure.host ?? host
            logger.debug("connect failed", metadata: ["db.host": "\(host)", "error.message": "\(failure.message)"])
            fail(withMachine { $0.machine.connectFailed(failure, now: .now) }, with: failure)
        }
    }

    private func fail(_ waiters: [Waiter], with error: DBError) {
        for waiter in waiters { waiter.resume(throwing: error) }
    }

    private func runTimer() async {
        while true {
            let interval = state.withLock { $0.machine.tickInterval }
            do {
                try await Task.sleep(for: interval)
            } catch {
                return  // shutdown
            }
            let action = withMachine { $0.machine.tick(now: .now) }
            if !action.expired.isEmpty {
                metrics.timeouts.increment(by: Int64(action.expired.count))
                let timeout = error(for: .leaseTimeout(lastConnectError: action.reason))
                for waiter in action.expired { waiter.resume(throwing: timeout) }
            }
            for connection in action.close { driver.closeQuietly(connection) }
            for _ in 0..<action.connects { startConnect() }
            guard action.keepTicking else { return }
        }
    }

    /// Resets a connection released clean, on the driver's callbacks: no task.
    private func reset(_ connection: Connection) {
        guard let reset = driver.reset else { return }
        reset(connection) { [self] succeeded in
            run(withMachine { $0.machine.resetFinished(connection, succeeded: succeeded && !driver.isClosed(connection), now: .now) })
        }
    }

    private func error(for failure: Machine.Failure) -> any Error {
        switch failure {
        case .connectFailed(let error):
            return error
        case .leaseTimeout(let lastConnectError?):
            return DBError(
                .connectionFailed,
                "no connection became free within \(leaseTimeout), and connecting failed meanwhile: \((lastConnectError as? DBError)?.message ?? "\(lastConnectError)")",
                host: host, underlying: lastConnectError
            )
        case .leaseTimeout(nil):
            return DBError(
                .connectionFailed,
                "no connection became free within \(leaseTimeout); the pool may be too small for the load, or sessions are held too long",
                host: host, underlying: PoolExhausted()
            )
        case .shutdown:
            return DBError(
                .connectionFailed, "the engine was shut down (DBConnect.close()); a new session creates a new engine",
                host: host
            )
        }
    }
}

extension PostgresConnection {
    /// Closes the connection without waiting for it.
    func closeQuietly() {
        let closed: EventLoopFuture<Void> = close()
        _ = closed
    }
}

/// The gauges and the timeout counter of one engine's pool (OpenTelemetry
/// `db.client.connection.count` by state, `.pending_requests`, `.timeouts`).
package final class PostgresPoolMetrics: Sendable {
    let idle: Gauge
    let used: Gauge
    let pending: Gauge
    let timeouts: Counter

    /// - Parameters:
    ///   - factory: Where the metrics go.
    ///   - dimensions: `db.system.name`, `db.client.connection.pool.name`, `server.address`, `server.port`.
    package init(factory: any MetricsFactory, dimensions: [(String, String)]) {
        idle = Gauge(label: DBMetricName.connectionCount, dimensions: dimensions + [("db.client.connection.state", "idle")], factory: factory)
        used = Gauge(label: DBMetricName.connectionCount, dimensions: dimensions + [("db.client.connection.state", "used")], factory: factory)
        pending = Gauge(label: DBMetricName.pendingRequests, dimensions: dimensions, factory: factory)
        timeouts = Counter(label: DBMetricName.connectionTimeouts, dimensions: dimensions, factory: factory)
    }

    /// Publishes the values that changed (`nil`: unchanged).
    func publish(idle: Int?, used: Int?, pending: Int?) {
        if let idle { self.idle.record(idle) }
        if let used { self.used.record(used) }
        if let pending { self.pending.record(pending) }
    }
}

/// The cause of a lease timeout on a pool that was only busy — no connect failed meanwhile: the
/// host is up, so routing does not mark it suspect.
struct PoolExhausted: Error, CustomStringConvertible {
    var description: String { "every connection of the pool stayed in use" }
}
