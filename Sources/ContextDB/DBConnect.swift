import CoreMetrics
import ServiceLifecycle
import Synchronization

/// One logical database — "primary", "replica" — and the engines that reach it, one per host.
///
/// Nothing connects when a connect is made. The engine for a host is created on the first
/// statement of the first session bound to that host, and reused after that. Before every
/// session is created, an optional hook picks its host: `chooseHost` returns a ``DBHostChoice``
/// (the topology's routing hooks are such), or — as in the Python original —
/// `beforeCreateSession` calls ``changeHost(_:)``. The session stays bound to that host for its
/// whole life, so concurrent requests never see a half-switched connect.
///
/// ```swift
/// let primary = DBConnect(label: "primary", host: "db1:5432") { host in
///     try PostgresEngine(url: "postgresql://app@\(host)/app")
/// }
/// try await withDBContext {
///     let session = try await primary.session()   // no connection yet
///     try await session.execute("INSERT INTO items (text) VALUES ('a')")
/// }                                               // committed and closed here
/// ```
public final class DBConnect<Engine: DatabaseEngine>: Sendable {
    /// The hook that runs before each session is created; it may call ``changeHost(_:)``, as
    /// `before_create_session_handler` does in the Python original.
    public typealias BeforeCreateSession = @Sendable (DBConnect<Engine>) async throws -> Void

    /// The hook that picks the host of each session about to be created, and returns it.
    public typealias ChooseHost = @Sendable (DBHostRequest<Engine>) async throws -> DBHostChoice

    /// A name for logs and errors, such as `"primary"` or `"replica"`.
    public let label: String
    /// How this connect's sessions open their transactions.
    public let options: DBSessionOptions

    /// Whether this connect's writes are prevented — for a maintenance window or a failover
    /// (as Rails' `while_preventing_writes`). While `true`, every new transaction of its
    /// sessions begins `READ ONLY`: reads keep working, and the first write fails at once with
    /// ``DBError/Code/writesPrevented`` (an HTTP 503 from the middlewares). A transaction that
    /// began before the switch keeps its mode. Savepoint sessions of a transactional test are
    /// not affected. Default `false`.
    public var preventsWrites: Bool {
        get { writePrevention.load(ordering: .relaxed) }
        set { writePrevention.store(newValue, ordering: .relaxed) }
    }

    /// ``preventsWrites`` for every connect of the process at once. Default `false`.
    public static var writesPreventedEverywhere: Bool {
        get { writesPreventedEverywhereFlag.load(ordering: .relaxed) }
        set { writesPreventedEverywhereFlag.store(newValue, ordering: .relaxed) }
    }

    /// Whether new transactions must not write: this connect's switch or the process's.
    var writesPrevented: Bool {
        preventsWrites || (DBWritePrevention.everywhere ?? Self.writesPreventedEverywhere)
    }

    private let writePrevention = Atomic<Bool>(false)
    /// Where this connect reports its metrics and spans.
    public let instrumentation: DBInstrumentation

    /// The host hook: `chooseHost`, or `beforeCreateSession` wrapped to return its choice.
    let chooseHost: ChooseHost?
    let makeEngine: @Sendable (String) async throws -> Engine
    let normalizeHost: (@Sendable (String) throws -> String)?

    enum EngineSlot: Sendable {
        case creating(Task<Engine, any Error>)
        case ready(Engine)
    }

    struct State: Sendable {
        var host: String?
        var engines: [String: EngineSlot] = [:]
    }

    /// What ``run()`` needs, apart from the hot state: leases never touch it.
    struct RunState: Sendable {
        /// Where engines' background work goes while ``run()`` runs; `nil` otherwise.
        var runner: AsyncStream<EngineJob>.Continuation?
        /// Engines retired while nothing ran: the next ``run()`` drains them.
        var pendingDrains: [Engine] = []
    }

    let state: Mutex<State>
    let runState = Mutex(RunState())
    /// Services that ``run()`` runs beside the engines: what an engine module made for this
    /// connect, such as the topology a URI's `target_session_attrs` asks for.
    let companions = Mutex<[any Service]>([])

    /// Runs `service` in ``run()`` beside the engines, from the next `run()` on.
    package func runAlongside(_ service: any Service) {
        companions.withLock { $0.append(service) }
    }
    /// The metrics and tracer of each host, made on its first lease. Not generic: reading it
    /// on every lease costs no type-metadata lookup.
    let instrumentsByHost = Mutex<[String: DBHostInstruments]>([:])
    /// Failover counters of hosts that have no instruments (they never served a lease).
    let failoverCounters = Mutex<[String: Counter]>([:])

    /// Declares a database. Nothing connects until a session runs its first statement.
    /// - Parameters:
    ///   - label: A name for logs and errors. Default `"default"`.
    ///   - host: The host to use when the hook chooses none. Optional when the hook always chooses.
    ///   - options: How sessions open transactions (read-only, isolation level).
    ///   - beforeCreateSession: Runs before every session creation; may call ``changeHost(_:)``.
    ///   - chooseHost: Runs before every session creation and returns its host. Pass it or
    ///     `beforeCreateSession`, not both.
    ///   - instrumentation: Where metrics and spans go. Default: the process-wide backends.
    ///   - normalizeHost: The canonical spelling of a host, so that one server is one host for
    ///     engines and routing (`db1` and `db1:5432` are the same server); throws for a malformed
    ///     host. Engine modules pass it; `nil` (the default) keeps hosts as given.
    ///   - engine: Creates the engine for a host. Called once per host, on first use.
    public init(
        label: String = "default",
        host: String? = nil,
        options: DBSessionOptions = DBSessionOptions(),
        beforeCreateSession: BeforeCreateSession? = nil,
        chooseHost: ChooseHost? = nil,
        instrumentation: DBInstrumentation = DBInstrumentation(),
        normalizeHost: (@Sendable (_ host: String) throws -> String)? = nil,
        engine: @escaping @Sendable (_ host: String) async throws -> Engine
    ) {
        precondition(beforeCreateSession == nil || chooseHost == nil, "pass beforeCreateSession or chooseHost, not both")
        self.label = label
        self.options = options
        self.instrumentation = instrumentation
        self.chooseHost = chooseHost ?? beforeCreateSession.map(HostSelection.choosing(by:))
        self.normalizeHost = normalizeHost
        self.makeEngine = engine
        self.state = Mutex(State(host: host.map { host in (try? normalizeHost?(host)) ?? host }))
    }

    /// The canonical spelling of `host` (see `init`'s `normalizeHost`).
    /// - Throws: ``DBError/Code/invalidConfiguration`` for a host the engine module rejects.
    func canonical(_ host: String) throws -> String {
        guard let normalizeHost else { return host }
        do {
            return try normalizeHost(host)
        } catch var error as DBError {
            error.connect = label
            throw error
        } catch {
            throw DBError(.invalidConfiguration, "the host \"\(host)\" is malformed", connect: label, underlying: error)
        }
    }

    /// The host new sessions bind to when the hook chooses none.
    public var host: String? { state.withLock { $0.host } }

    /// The engines created so far, by host (engines still being created are left out).
    package var engines: [String: Engine] {
        state.withLock { state in
            state.engines.compactMapValues { slot in
                if case .ready(let engine) = slot { return engine }
                return nil
            }
        }
    }

    /// The hosts that have an engine (created or being created).
    package var engineHosts: [String] { state.withLock { Array($0.engines.keys).sorted() } }

    // MARK: - Hosts and engines

    /// Sets the host and creates its engine now, instead of on first use.
    /// - Parameter host: The host, such as `"db1:5432"`.
    /// - Throws: ``DBError/Code/emptyHost``, or ``DBError/Code/engineCreationFailed``.
    public func connect(host: String) async throws {
        try changeHost(host)
        _ = try await engine(for: host)
    }

    /// Chooses the host for new sessions.
    ///
    /// Called from `beforeCreateSession`, it picks the host of the session being created, and
    /// only that one: concurrent creations each keep their own choice (it is the returned
    /// ``DBHostChoice`` of a `chooseHost` hook, written the Python original's way). The chosen host also
    /// becomes the connect's default. Sessions already created keep their host. Unlike the Python
    /// original, switching does not dispose of the old host's engine: each host keeps its own,
    /// so switching back and forth costs nothing.
    /// - Parameter host: The host; must not be empty.
    /// - Throws: ``DBError/Code/emptyHost``.
    public func changeHost(_ host: String) throws {
        try changeHost(host, fallbacks: [])
    }

    /// Chooses the host for the session being created, with hosts to fall back to.
    ///
    /// The session leases from `host`; if that lease fails before the session ever had a
    /// connection, it tries each of `fallbacks` in order, calling `onLeaseFailure` for every
    /// host that failed, and throws a ``DBError`` listing every host tried only when all fail.
    /// Outside `beforeCreateSession` it sets the default host like ``changeHost(_:)``.
    /// - Parameters:
    ///   - host: The preferred host.
    ///   - fallbacks: Hosts to try next, in order.
    ///   - onLeaseFailure: Told about each host whose lease failed (to mark it suspect, say).
    /// - Throws: ``DBError/Code/emptyHost`` when any host is empty.
    public func changeHost(
        _ host: String,
        fallbacks: [String],
        onLeaseFailure: (@Sendable (String, DBError) -> Void)? = nil
    ) throws {
        guard !host.isEmpty, !fallbacks.contains(where: \.isEmpty) else {
            throw DBError(.emptyHost, "the host is empty; pass a host such as \"127.0.0.1:5432\"", connect: label)
        }
        let host = try canonical(host)
        state.withLock { $0.host = host }
        if let selection = HostSelection.current, selection.connect == ObjectIdentifier(self) {
            selection.choose(DBHostChoice(host, fallbacks: fallbacks, onLeaseFailure: onLeaseFailure))
        }
    }

    /// Takes out and drains the engines the choice retires: every host's but the chosen one
    /// (``DBHostChoice/retiresOtherHosts``), or those of hosts that left the cluster
    /// (``DBHostChoice/retiredHosts``).
    private func retireEngines(of choice: DBHostChoice, chosen host: String) {
        if choice.retiresOtherHosts {
            retireEngines { $0 != host }
        } else if !choice.retiredHosts.isEmpty {
            let retired = Set(choice.retiredHosts.compactMap { try? canonical($0) })
            retireEngines { $0 != host && retired.contains($0) }
        }
    }

    private func retireEngines(where isRetired: (String) -> Bool) {
        let retired = state.withLock { state -> [Engine] in
            var retired: [Engine] = []
            for (other, slot) in state.engines where isRetired(other) {
                guard case .ready(let engine) = slot else { continue }
                state.engines[other] = nil
                retired.append(engine)
            }
            return retired
        }
        guard !retired.isEmpty else { return }
        let runner = runState.withLock { run in
            if run.runner == nil { run.pendingDrains += retired }
            return run.runner
        }
        for engine in retired { runner?.yield(.drain(engine)) }
    }

    /// The metrics and tracer for `host`, made on first use and kept.
    func instruments(for host: String, engine: Engine) -> DBHostInstruments {
        if let made = instrumentsByHost.withLock({ $0[host] }) { return made }
        let made = DBHostInstruments(
            instrumentation: instrumentation, label: label, host: host, systemName: Engine.systemName, namespace: engine.namespace
        )
        return instrumentsByHost.withLock { instruments in
            if let existing = instruments[host] { return existing }
            instruments[host] = made
            return made
        }
    }

    /// Counts a session that moved on from `host` because its first lease failed there.
    func countFailover(from host: String) {
        let counter = instrumentsByHost.withLock { $0[host]?.failovers } ?? failoverCounters.withLock { counters in
            if let counter = counters[host] { return counter }  // a host that never served a lease
            let counter = Counter(
                label: DBMetricName.failovers,
                dimensions: DBHostInstruments.dimensions(label: label, host: host, systemName: Engine.systemName),
                factory: instrumentation.metricsFactory ?? MetricsSystem.factory
            )
            counters[host] = counter
            return counter
        }
        counter.increment()
    }

    /// Shuts down every engine. A later session creates its engine again, lazily.
    public func close() async {
        let slots = state.withLock { state in
            defer { state.engines.removeAll() }
            return Array(state.engines.values)
        }
        for slot in slots {
            switch slot {
            case .ready(let engine):
                await engine.shutdown()
            case .creating(let task):
                if let engine = try? await task.value { await engine.shutdown() }
            }
        }
    }

    /// The engine for `host`, created on first use. Concurrent first uses share one creation.
    nonisolated(nonsending) func engine(for host: String) async throws -> Engine {
        let host = try canonical(host)
        let slot = state.withLock { state -> EngineSlot in
            if let slot = state.engines[host] { return slot }
            let factory = makeEngine
            let slot = EngineSlot.creating(Task { try await factory(host) })
            state.engines[host] = slot
            return slot
        }
        guard case .creating(let task) = slot else {
            guard case .ready(let engine) = slot else { fatalError("unreachable") }
            return engine
        }
        do {
            let engine = try await task.value
            // Run now when run() runs; else the next run() starts it (it runs the ready engines).
            // Both locks held, so run() starting meanwhile sees either the ready engine or the
            // runner-less creation, never neither.
            let runner = runState.withLock { run in
                state.withLock { state -> AsyncStream<EngineJob>.Continuation? in
                    guard case .creating(let current) = state.engines[host], current == task else { return nil }
                    state.engines[host] = .ready(engine)
                    return run.runner
                }
            }
            runner?.yield(.run(engine))
            return engine
        } catch {
            state.withLock { state in
                if case .creating(let current) = state.engines[host], current == task {
                    state.engines[host] = nil
                }
            }
            if let error = error as? DBError, error.code == .engineCreationFailed { throw error }
            throw DBError(
                .engineCreationFailed,
                "could not create the engine; check the host and the engine's configuration",
                connect: label, host: host, underlying: error
            )
        }
    }

    // MARK: - Sessions

    /// Creates a session for `context` (or none): asks the host hook, binds the chosen host.
    /// Connects nothing.
    nonisolated(nonsending) func makeSession(for context: DBContext?) async throws -> DBSession<Engine> {
        let choice: DBHostChoice
        if let chooseHost {
            choice = try await chooseHost(DBHostRequest(connect: self, consistencyToken: context?.consistencyToken))
        } else if let host {
            choice = DBHostChoice(host)
        } else {
            throw DBError(
                .hostNotSet,
                "no host is set; pass host: to DBConnect, call connect(host:), or choose one in the host hook (chooseHost, or beforeCreateSession with changeHost(_:))",
                connect: label
            )
        }
        let hosts = try candidates(of: choice)
        retireEngines(of: choice, chosen: hosts[0])
        return DBSession(
            connect: self, candidates: hosts, onLeaseFailure: choice.onLeaseFailure, consistency: context?.consistency,
            routing: choice.role == nil && choice.reason == nil ? nil : DBRoutingNote(role: choice.role, reason: choice.reason)
        )
    }

    /// The hosts a session whose every candidate refused its first lease tries next: the host
    /// hook asked again — by then it may know, or wait for, a new primary (a failover) — or
    /// `nil` without a hook.
    nonisolated(nonsending) func rerouted(consistencyToken: String?) async throws -> [String]? {
        guard let chooseHost else { return nil }
        let choice = try await chooseHost(DBHostRequest(connect: self, consistencyToken: consistencyToken))
        let hosts = try candidates(of: choice)
        retireEngines(of: choice, chosen: hosts[0])
        return hosts
    }

    /// The hosts a session tries, canonical and without repeats: the chosen one first.
    private func candidates(of choice: DBHostChoice) throws -> [String] {
        guard !choice.host.isEmpty, !choice.fallbacks.contains(where: \.isEmpty) else {
            throw DBError(.emptyHost, "the host hook chose an empty host; choose one such as \"127.0.0.1:5432\"", connect: label)
        }
        var hosts = [try canonical(choice.host)]
        for fallback in choice.fallbacks {
            let fallback = try canonical(fallback)
            if !hosts.contains(fallback) { hosts.append(fallback) }
        }
        return hosts
    }

    /// The current context's session for this connect, created on first call.
    ///
    /// Later calls in the same context, also from child tasks, return the same session.
    /// Creating it connects nothing; its first statement leases a connection and begins a transaction.
    /// - Returns: The context's session.
    /// - Throws: ``DBError/Code/noContext`` outside a context (note: `Task.detached` has none),
    ///   ``DBError/Code/hostNotSet``, or what `beforeCreateSession` throws.
    @inlinable
    nonisolated(nonsending) public func session() async throws -> DBSession<Engine> {
        // Inlined into the caller, the common case — the context has the session — is one
        // synchronous call: no async frame of its own.
        if let session = try existingSession() { return session }
        return try await createSession()
    }

    /// Creates the context's session (``session()`` found none).
    @usableFromInline
    nonisolated(nonsending) func createSession() async throws -> DBSession<Engine> {
        let context = try requireContext()
        let created = try await makeSession(for: context)
        return try context.insert(created, for: self)
    }

    /// The current context's live session for this connect, if it has one.
    @usableFromInline
    func existingSession() throws -> DBSession<Engine>? {
        guard let session = try requireContext().liveSession(for: ObjectIdentifier(self), label: label) else { return nil }
        return storedSession(session, of: self)
    }

    func requireContext() throws -> DBContext {
        guard let context = DBContext.current else {
            throw DBError(
                .noContext,
                "no request context is active; run the code inside withDBContext { } or behind DBSessionMiddleware (Task.detached does not inherit the context)",
                connect: label
            )
        }
        return context
    }
}

/// The host chosen by one run of a `beforeCreateSession` hook, visible to
/// ``DBConnect/changeHost(_:)`` through a task-local, so concurrent session creations never share
/// a choice: the thin layer that turns the Python original's hook into a `ChooseHost`.
final class HostSelection: Sendable {
    @TaskLocal static var current: HostSelection?

    let connect: ObjectIdentifier
    private let chosen = Mutex<DBHostChoice?>(nil)

    init(connect: ObjectIdentifier) {
        self.connect = connect
    }

    func choose(_ choice: DBHostChoice) {
        chosen.withLock { $0 = choice }
    }

    /// A `ChooseHost` that runs `hook` and returns what it chose with `changeHost`, or the
    /// connect's default host.
    static func choosing<Engine>(by hook: @escaping DBConnect<Engine>.BeforeCreateSession) -> DBConnect<Engine>.ChooseHost {
        { request in
            let defaultHost = request.connect.host  // as the hook found it: another task may change it meanwhile
            let selection = HostSelection(connect: ObjectIdentifier(request.connect))
            try await $current.withValue(selection) { try await hook(request.connect) }
            if let choice = selection.chosen.withLock({ $0 }) { return choice }
            guard let host = defaultHost else {
                throw DBError(
                    .hostNotSet,
                    "no host is set; pass host: to DBConnect, call connect(host:), or choose one in beforeCreateSession with changeHost(_:)",
                    connect: request.connect.label
                )
            }
            return DBHostChoice(host)
        }
    }
}

/// ``DBConnect/writesPreventedEverywhere``: one for all connects, whatever their engine.
private let writesPreventedEverywhereFlag = Atomic<Bool>(false)

/// The process-wide write switch as one task sees it.
package enum DBWritePrevention {
    /// Runs `body` with ``DBConnect/writesPreventedEverywhere`` overridden to `value` in this
    /// task and its children: the core's tests check the switch without flipping it under the
    /// tests that run beside them.
    package static func withEverywhere<R>(_ value: Bool, _ body: () async throws -> R) async rethrows -> R {
        overrides.add(1, ordering: .relaxed)
        defer { overrides.subtract(1, ordering: .relaxed) }
        return try await $everywhereInThisTask.withValue(value, operation: body)
    }

    /// The override of the current task, if any. Without one in the process, one atomic load:
    /// no task-local lookup on every `BEGIN`.
    static var everywhere: Bool? {
        overrides.load(ordering: .relaxed) == 0 ? nil : everywhereInThisTask
    }

    @TaskLocal private static var everywhereInThisTask: Bool?
    private static let overrides = Atomic<Int>(0)
}
