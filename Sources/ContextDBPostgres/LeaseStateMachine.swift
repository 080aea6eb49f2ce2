/// The bookkeeping of an engine's connection pool, with no I/O and no clock of its own.
///
/// Every event (a lease, a release, a connect that finished, a timer tick) changes the state
/// under the engine's lock and returns what to do; the engine does it after the lock is
/// released — resumes a waiter, opens or closes a connection, resets one — the way
/// postgres-nio's `PoolStateMachine` works. Time comes in as an argument, so the tests drive
/// the machine with a mock clock and mock connections, no server.
///
/// The rules:
/// - A lease takes the most recently returned idle connection (its caches are warm), else
///   waits, first come first served, and a connect starts when the pool is below its maximum.
/// - A connection released clean is reset (when ``Configuration/resetsOnRelease``) before it
///   serves anyone; one released dirty, or whose reset failed, is closed.
/// - A connect failure is the server's reason for every waiter no connection can serve any
///   more. For ``Configuration/connectRetryDelay`` afterwards no new connect starts: a lease
///   that nothing can serve fails at once with that reason, so a wrong password never turns
///   into a storm of login attempts.
/// - A waiter fails after ``Configuration/leaseTimeout``; an idle connection is closed after
///   ``Configuration/idleTimeout``.
/// - After ``shutdown()`` every waiter fails, idle and leased connections are closed, and a
///   connect that still finishes closes its connection.
struct LeaseStateMachine<Connection: AnyObject, Waiter, Instant: InstantProtocol> where Instant.Duration == Duration {
    struct Configuration {
        /// The most connections open at once: idle, leased, being reset and being opened.
        var maximumConnections: Int
        /// The longest a lease waits.
        var leaseTimeout: Duration
        /// How long an unused connection stays open.
        var idleTimeout: Duration
        /// Whether a connection released clean is reset before it serves another lease.
        var resetsOnRelease: Bool
        /// How long after a failed connect no new one starts.
        var connectRetryDelay: Duration
    }

    /// Why a waiter gets no connection.
    enum Failure {
        /// It waited ``Configuration/leaseTimeout``; with the error of a connect that failed
        /// meanwhile, if one did.
        case leaseTimeout(lastConnectError: (any Error)?)
        /// Connecting failed with this error, and no connection can serve the waiter.
        case connectFailed(any Error)
        /// The pool shut down.
        case shutdown
    }

    enum LeaseAction {
        /// The connection is the lease's.
        case handOut(Connection)
        /// The lease waits (call ``wait(id:waiter:now:)``).
        case wait
        /// The lease fails.
        case fail(Failure)
    }

    enum WaitAction {
        /// The connection is the waiter's right away.
        case handOut(Connection)
        /// The waiter is queued; open a connection when `connect`, start the timer when `startTimer`.
        case queued(connect: Bool, startTimer: Bool)
        /// The lease fails.
        case fail(Failure)
    }

    /// What to do with a connection that came back (opened, released, reset).
    enum ReturnAction {
        /// Nothing: it is idle now (start the timer when `startTimer`), or it was not ours.
        case none(startTimer: Bool)
        /// Hand it to this waiter.
        case handOut(Waiter, Connection)
        /// Reset it, then report ``resetFinished(_:succeeded:now:)``.
        case reset(Connection)
        /// Close it; open a replacement for a waiter when `connect`.
        case close(Connection, connect: Bool)
    }

    struct TickAction {
        /// Waiters past their deadline.
        var expired: [Waiter] = []
        /// Why they got nothing, when a connect failed meanwhile.
        var reason: (any Error)?
        /// Idle connections past the idle timeout.
        var close: [Connection] = []
        /// How many connections to open for the waiters (the retry delay is over).
        var connects = 0
        /// Whether to tick again (``tickInterval``); otherwise the timer stops.
        var keepTicking = false
    }

    struct ShutdownAction {
        var fail: [Waiter] = []
        var close: [Connection] = []
    }

    private struct Idle {
        let connection: Connection
        let since: Instant
    }

    private struct Pending {
        let id: Int
        let waiter: Waiter
        let deadline: Instant
    }

    let configuration: Configuration
    /// Idle connections, most recently returned last.
    private var idle: [Idle] = []
    private var leased: [ObjectIdentifier: Connection] = [:]
    private var resetting: [ObjectIdentifier: Connection] = [:]
    private var connecting = 0
    /// Waiters in arrival order.
    private var pending: [Pending] = []
    private var lastFailure: (error: any Error, retryAt: Instant)?
    /// The error of the last failed connect, until a connect succeeds: the reason a waiter
    /// that times out gets along.
    private var lastConnectError: (any Error)?
    private var timerRunning = false
    private(set) var isShutDown = false

    init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Connections sessions hold now.
    var leasedCount: Int { leased.count }
    /// Connections open or being opened.
    var connectionCount: Int { idle.count + leased.count + resetting.count + connecting }
    /// Connects in flight.
    var connectingCount: Int { connecting }
    /// Open connections waiting for a lease.
    var idleCount: Int { idle.count }
    /// Leases waiting for a connection.
    var pendingCount: Int { pending.count }
    /// Leases waiting.
    var waitingCount: Int { pending.count }
    /// How often the timer ticks: often while leases wait, seldom while only idle connections age.
    var tickInterval: Duration { pending.isEmpty ? .seconds(1) : .milliseconds(100) }

    // MARK: - Leasing

    /// A lease arrives: an idle connection serves it at once; otherwise it must wait.
    mutating func lease(now: Instant) -> LeaseAction {
        if isShutDown { return .fail(.shutdown) }
        if let connection = takeIdle() { return .handOut(connection) }
        if let failure = failFast(now: now) { return .fail(failure) }
        return .wait
    }

    /// Queues a waiter (after ``lease(now:)`` answered ``LeaseAction/wait``). Checks the idle
    /// connections again: one may have come back in between. The waiter fails
    /// ``Configuration/leaseTimeout`` after `arrived` (when the lease began; `now` by default).
    mutating func wait(id: Int, waiter: Waiter, now: Instant, arrived: Instant? = nil) -> WaitAction {
        if isShutDown { return .fail(.shutdown) }
        if let connection = takeIdle() { return .handOut(connection) }
        if let failure = failFast(now: now) { return .fail(failure) }
        pending.append(Pending(id: id, waiter: waiter, deadline: (arrived ?? now).advanced(by: configuration.leaseTimeout)))
        let connect = startConnectIfNeeded(now: now)
        return .queued(connect: connect, startTimer: startTimer())
    }

    /// Removes a waiter that gave up (cancelled); `nil` when it is not waiting any more.
    mutating func cancel(id: Int) -> Waiter? {
        guard let index = pending.firstIndex(where: { $0.id == id }) else { return nil }
        return pending.remove(at: index).waiter
    }

    /// A session gives its connection back; `reusable` is `false` when it may be dirty.
    mutating func release(_ connection: Connection, reusable: Bool, now: Instant) -> ReturnAction {
        guard leased.removeValue(forKey: ObjectIdentifier(connection)) != nil else { return .none(startTimer: false) }
        guard reusable, !isShutDown else { return closeAndReplace(connection, now: now) }
        guard configuration.resetsOnRelease else { return makeAvailable(connection, now: now) }
        resetting[ObjectIdentifier(connection)] = connection
        return .reset(connection)
    }

    /// The reset of a released connection finished.
    mutating func resetFinished(_ connection: Connection, succeeded: Bool, now: Instant) -> ReturnAction {
        guard resetting.removeValue(forKey: ObjectIdentifier(connection)) != nil else { return .none(startTimer: false) }
        guard succeeded, !isShutDown else { return closeAndReplace(connection, now: now) }
        return makeAvailable(connection, now: now)
    }

    // MARK: - Connecting

    /// A connect the machine asked for succeeded.
    mutating func connected(_ connection: Connection, now: Instant) -> ReturnAction {
        connecting -= 1
        lastFailure = nil
        lastConnectError = nil
        if isShutDown { return .close(connection, connect: false) }
        return makeAvailable(connection, now: now)
    }

    /// A connect the machine asked for failed: the waiters that no connection can serve any
    /// more fail with `error` (the newest first; the oldest keep their place for connections
    /// that come back), and no connect starts before ``Configuration/connectRetryDelay``.
    mutating func connectFailed(_ error: any Error, now: Instant) -> [Waiter] {
        connecting -= 1
        lastFailure = (error, now.advanced(by: configuration.connectRetryDelay))
        lastConnectError = error
        let servable = leased.count + resetting.count + connecting
        guard pending.count > servable else { return [] }
        let failed = pending[servable...].map(\.waiter)
        pending.removeSubrange(servable...)
        return failed
    }

    /// The server (or the network) closed a connection: an idle one leaves the pool. A leased
    /// one stays the session's until it releases it.
    mutating func closed(_ connection: Connection) {
        let id = ObjectIdentifier(connection)
        idle.removeAll { ObjectIdentifier($0.connection) == id }
    }

    /// Starts as many connects as the waiters need and the pool has room for (after a connect
    /// succeeded, the pool refills at once instead of one connect per waiter event); returns
    /// how many.
    mutating func startConnects(now: Instant) -> Int {
        var started = 0
        while !isShutDown, startConnectIfNeeded(now: now) { started += 1 }
        return started
    }

    // MARK: - Time

    /// The timer fired: waiters past their deadline fail, idle connections past the idle
    /// timeout close, and a connect starts for waiters once the retry delay is over.
    mutating func tick(now: Instant) -> TickAction {
        var action = TickAction()
        if pending.contains(where: { $0.deadline <= now }) {
            action.reason = lastConnectError
            action.expired = pending.filter { $0.deadline <= now }.map(\.waiter)
            pending.removeAll { $0.deadline <= now }
        }
        let expiry = now.advanced(by: .zero - configuration.idleTimeout)
        if idle.contains(where: { $0.since <= expiry }) {
            action.close = idle.filter { $0.since <= expiry }.map(\.connection)
            idle.removeAll { $0.since <= expiry }
        }
        action.connects = isShutDown ? 0 : startConnects(now: now)
        action.keepTicking = !isShutDown && (!pending.isEmpty || !idle.isEmpty)
        timerRunning = action.keepTicking
        return action
    }

    /// Stops the pool: waiters fail, idle and leased connections close (a leased connection may
    /// be inside a transaction: closing it rolls that back), and so do connections still being
    /// reset. Connects in flight close their connection when they finish.
    mutating func shutdown() -> ShutdownAction {
        guard !isShutDown else { return ShutdownAction() }
        isShutDown = true
        defer {
            pending.removeAll()
            idle.removeAll()
            leased.removeAll()
            resetting.removeAll()
        }
        return ShutdownAction(
            fail: pending.map(\.waiter),
            close: idle.map(\.connection) + Array(leased.values) + Array(resetting.values)
        )
    }

    // MARK: - Private

    private mutating func takeIdle() -> Connection? {
        guard let connection = idle.popLast()?.connection else { return nil }
        leased[ObjectIdentifier(connection)] = connection
        return connection
    }

    /// The last connect failed a moment ago and nothing can serve a new lease: it fails now.
    private func failFast(now: Instant) -> Failure? {
        guard let lastFailure, now < lastFailure.retryAt else { return nil }
        guard leased.isEmpty, resetting.isEmpty, connecting == 0 else { return nil }
        return .connectFailed(lastFailure.error)
    }

    /// Starts one connect when a waiter has nothing coming for it and the pool has room.
    private mutating func startConnectIfNeeded(now: Instant) -> Bool {
        guard !pending.isEmpty, pending.count > connecting + resetting.count else { return false }
        guard connectionCount < configuration.maximumConnections else { return false }
        if let lastFailure, now < lastFailure.retryAt { return false }
        connecting += 1
        return true
    }

    private mutating func startTimer() -> Bool {
        defer { timerRunning = true }
        return !timerRunning
    }

    /// A clean connection serves the oldest waiter, or becomes idle.
    private mutating func makeAvailable(_ connection: Connection, now: Instant) -> ReturnAction {
        if !pending.isEmpty {
            let next = pending.removeFirst()
            leased[ObjectIdentifier(connection)] = connection
            return .handOut(next.waiter, connection)
        }
        idle.append(Idle(connection: connection, since: now))
        return .none(startTimer: startTimer())
    }

    private mutating func closeAndReplace(_ connection: Connection, now: Instant) -> ReturnAction {
        .close(connection, connect: !isShutDown && startConnectIfNeeded(now: now))
    }
}
