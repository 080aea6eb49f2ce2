import ContextDB
import CoreMetrics
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// Knows the cluster: probes every host in the background and keeps a snapshot of who is the
/// primary, who is a replica, who is healthy and how far each replica lags.
///
/// Run it as a long-running service (it is a ServiceLifecycle `Service`; add it to your
/// application's services, or call ``run()`` in a task of your own). Routing reads the
/// snapshot, so choosing a host never adds a query to a request. The ready-made hooks
/// ``primaryHook()`` and ``replicaHook(policy:maximumLagBytes:maximumLag:fallbackToPrimary:readYourWritesWait:)``
/// plug it into `DBConnect`'s `beforeCreateSession`.
///
/// Each host is probed on its own, with its own timeout, so a frozen host (one that accepts TCP
/// and answers nothing) never delays the others' entries. A host is marked down when a probe
/// gets no answer within ``Configuration/probeTimeout`` (at most that plus one
/// ``Configuration/probeInterval`` after it froze), after ``Configuration/failuresBeforeDown``
/// other probe failures in a row, or at once when a session could not lease a connection from it
/// (it is then "suspect"); one good probe brings it back.
///
/// A replica's probe also reads its WAL receiver's status (`pg_stat_wal_receiver`) and its replay
/// lag in seconds, so routing can refuse a replica that lost its primary (see
/// ``HostStatus/unfitReason(maximumLagBytes:maximumLag:)``).
public final class PostgresTopology: Service, Sendable {
    /// How and how often the hosts are probed.
    public struct Configuration: Sendable {
        /// The time between two probe rounds. Default 500 ms.
        public var probeInterval: Duration = .milliseconds(500)
        /// The first time between two probes of a host while no primary is known — a failover
        /// under way, or a primary not up yet: probes come this often, then twice as far apart
        /// each round up to the smaller of ``probeInterval`` and 1 s, and back to
        /// ``probeInterval`` once a primary is found. Default 100 ms.
        public var failoverProbeInterval: Duration = .milliseconds(100)
        /// How long a session that needs the primary waits for one while none is known — a
        /// failover under way — before it fails with `DBError.Code.noHostAvailable`. It is woken
        /// as soon as a probe finds a primary (no polling), and gives up on cancellation.
        /// Default 0: fail at once. The example uses 10 s.
        public var primaryWaitTimeout: Duration = .zero
        /// The most sessions that wait for a primary at once; beyond it they fail at once, so a
        /// long outage does not pile up work. Default 100.
        public var maximumPrimaryWaiters: Int = 100
        /// The longest one probe (connect + query) may take; a host that does not answer within
        /// it is marked down at once. Default 2 s.
        public var probeTimeout: Duration = .seconds(2)
        /// Failed probes in a row before a host is marked down. Default 3.
        public var failuresBeforeDown: Int = 3

        /// Creates the default configuration.
        public init() {}
    }

    /// What a host is, as of its last probe.
    public enum Role: String, Sendable, Hashable {
        /// Accepts writes (`pg_is_in_recovery()` is false).
        case primary
        /// A hot standby replaying the primary's WAL.
        case replica
        /// Never answered a probe yet.
        case unknown
    }

    /// One host's state in the snapshot.
    public struct HostStatus: Sendable, Hashable {
        /// The server.
        public var endpoint: PostgresEndpoint
        /// Its role at the last good probe.
        public var role: Role
        /// Whether routing may use it: answered its last probe, or failed fewer than
        /// ``Configuration/failuresBeforeDown`` in a row and no lease failed since.
        public var isHealthy: Bool
        /// For the primary, its current WAL position; for a replica, its replay position.
        public var position: PostgresLSN?
        /// For a replica, how many WAL bytes it is behind the primary (0 when caught up).
        public var lagBytes: UInt64?
        /// For a replica, seconds since the last transaction it replayed was committed on the
        /// primary (`now() - pg_last_xact_replay_timestamp()`), or 0 when it has replayed all the
        /// WAL it received (an idle primary is no lag); `nil` when unknown.
        public var lagSeconds: Double?
        /// For a replica, its WAL receiver's status (`pg_stat_wal_receiver.status`, e.g.
        /// `streaming`), or `stopped` when no receiver runs — the replica lost its primary.
        /// `nil` when a receiver runs but the probing role may not read its status; routing then
        /// takes it as streaming, so a receiver stuck reconnecting to a vanished primary goes
        /// unnoticed: grant the probing role `pg_monitor` (or `pg_read_all_stats`).
        public var walReceiverStatus: String?
        /// The replay lag in seconds of the probe before the last, for ``unfitReason(maximumLagBytes:maximumLag:)``:
        /// a time lag must hold on two probes in a row, as the first write after an idle spell
        /// briefly reads as a lag as long as the spell.
        var previousLagSeconds: Double?
        /// Failed probes in a row.
        public var consecutiveFailures: Int
        /// Why the last probe or lease failed, without secrets.
        public var lastError: String?

        /// Why this host may not serve reads routed to replicas, or `nil` when it may: it must be a
        /// healthy replica whose WAL receiver is streaming and that lags within each limit that is
        /// set (a lag not known yet counts as within; a time lag must exceed the limit on two
        /// probes in a row). A read with a read-your-own-writes position also needs the replica to
        /// have replayed up to it.
        /// - Parameters:
        ///   - maximumLagBytes: The most WAL bytes it may lag; `nil` for no limit.
        ///   - maximumLag: The most replay lag in time; `nil` for no limit.
        /// - Returns: A sentence for logs and `/topology`-style reports, or `nil` when fit.
        public func unfitReason(maximumLagBytes: UInt64?, maximumLag: Duration?) -> String? {
            guard isHealthy else { return "down: \(lastError ?? "no answer yet")" }
            guard role == .replica else { return role == .primary ? "the primary" : "role unknown" }
            if let walReceiverStatus, walReceiverStatus != "streaming" {
                return "its WAL receiver is not streaming (\(walReceiverStatus)): it lost its primary"
            }
            if let maximumLagBytes, let lagBytes, lagBytes > maximumLagBytes {
                return "lags \(lagBytes) bytes (limit \(maximumLagBytes))"
            }
            let limit = maximumLag.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }
            if let limit, let lagSeconds, lagSeconds > limit, let previousLagSeconds, previousLagSeconds > limit {
                return "lags \(lagSeconds) s (limit \(maximumLag.map { "\($0)" } ?? ""))"
            }
            return nil
        }
    }

    /// The state of every host at one moment.
    public struct Snapshot: Sendable {
        /// Every configured host, in configuration order (a changing ``DBHostSource``'s: in the
        /// order of its last lookup).
        public var hosts: [HostStatus]
        /// Hosts that left the cluster (`"host:port"`), whose engines the hooks tell connects to
        /// drain; a host that comes back leaves it. At most ``departedLimit``, the oldest
        /// forgotten first.
        var departed: [String] = []
        static let departedLimit = 256

        /// The healthy primary; with two (during a failover), the one with the fewest recent
        /// failures, then the furthest WAL position.
        public var primary: HostStatus? {
            hosts.filter { $0.role == .primary && $0.isHealthy }
                .min { ($0.consecutiveFailures, -Int64(bitPattern: $0.position?.value ?? 0)) < ($1.consecutiveFailures, -Int64(bitPattern: $1.position?.value ?? 0)) }
        }

        /// The healthy replicas.
        public var replicas: [HostStatus] {
            hosts.filter { $0.role == .replica && $0.isHealthy }
        }
    }

    /// The probe settings.
    public let configuration: Configuration
    /// Where probes and routing decisions are logged (decisions at debug level).
    public let logger: Logger

    private let url: PostgresURL
    private let state: Mutex<Snapshot>
    private let probeConnections = Mutex<[PostgresEndpoint: PostgresConnection]>([:])
    private let warnedUnprivileged = Atomic<Bool>(false)
    /// Until every host has had its first probe: the hosts still unprobed, and the hooks
    /// waiting for them (by id). `nil` once the first round is complete.
    private let firstRound: Mutex<FirstRound?>

    private struct FirstRound {
        /// The hosts not probed yet.
        var unprobed: Set<PostgresEndpoint>
        /// Whether the hosts are known: always for a fixed source, after the first good lookup
        /// for one that changes.
        var resolved: Bool
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    }

    /// Where the hosts come from.
    public let hostSource: DBHostSource
    /// The running ``run()``'s feed of hosts to start probing; `nil` while it does not run.
    private let probeLoopStarter = Mutex<AsyncStream<PostgresEndpoint>.Continuation?>(nil)
    /// The hosts a probe loop of ``run()`` probes.
    private let probeLoops = Mutex<Set<PostgresEndpoint>>([])
    private let nextWaiter = Atomic<Int>(0)
    /// Sessions waiting for a primary, resumed by the probe that finds one.
    private let primaryWaiters = Mutex<[Int: CheckedContinuation<Void, Never>]>([:])
    let turn = Atomic<Int>(0)
    /// Per-host gauges, routing counters and the read-your-own-writes wait.
    let metrics: PostgresTopologyMetrics

    /// Creates a topology for the hosts of a URI. Probes nothing until ``run()`` or ``refresh()``.
    /// - Parameters:
    ///   - url: The cluster's URI (all hosts; the credentials are used for the probes).
    ///   - configuration: Probe interval, timeout and hysteresis.
    ///   - hosts: Where the hosts come from: the URI's (the default), a DNS name looked up
    ///     again every interval, or your own code (see ``DBHostSource``).
    ///   - logger: Where to log.
    ///   - instrumentation: Where the per-host gauges (`contextdb.host.health`,
    ///     `contextdb.replica.lag`) and the routing metrics go. Default: the process-wide backend.
    /// - Throws: `DBError` for a malformed URI.
    public convenience init(
        url: String,
        configuration: Configuration = Configuration(),
        hosts: DBHostSource = .url,
        logger: Logger = Logger(label: "ContextDB.Topology"),
        instrumentation: DBInstrumentation = DBInstrumentation()
    ) throws {
        self.init(
            url: try PostgresURL(url), configuration: configuration, hosts: hosts, logger: logger, instrumentation: instrumentation
        )
    }

    /// Creates a topology for the hosts of a parsed URI.
    /// - Parameters:
    ///   - url: The cluster's parsed URI.
    ///   - configuration: Probe interval, timeout and hysteresis.
    ///   - hosts: Where the hosts come from (see ``DBHostSource``). Default: the URI's.
    ///   - logger: Where to log.
    ///   - instrumentation: Where the topology's metrics go. Default: the process-wide backend.
    public init(
        url: PostgresURL,
        configuration: Configuration = Configuration(),
        hosts: DBHostSource = .url,
        logger: Logger = Logger(label: "ContextDB.Topology"),
        instrumentation: DBInstrumentation = DBInstrumentation()
    ) {
        var initial: [PostgresEndpoint] = []
        var resolved = false
        if case .fixed(let endpoints) = hosts.kind {
            initial = endpoints ?? url.endpoints
            resolved = true
        }
        self.url = url
        self.hostSource = hosts
        self.metrics = PostgresTopologyMetrics(
            factory: instrumentation.metricsFactory ?? MetricsSystem.factory, endpoints: initial
        )
        self.configuration = configuration
        self.logger = logger
        // A fixed source with no host has nothing to wait for: sessions fail at once.
        self.firstRound = Mutex(resolved && initial.isEmpty ? nil : FirstRound(unprobed: Set(initial), resolved: resolved))
        self.state = Mutex(Snapshot(hosts: initial.map(Self.newHost)))
    }

    private static func newHost(_ endpoint: PostgresEndpoint) -> HostStatus {
        HostStatus(endpoint: endpoint, role: .unknown, isHealthy: false, consecutiveFailures: 0)
    }

    /// The state of every host as of the last probe round. No I/O: a lock and a copy.
    public var snapshot: Snapshot { state.withLock { $0 } }

    /// Whether the topology is live: its ``run()`` is probing the hosts (a liveness probe's
    /// answer, as Kubernetes' `livenessProbe` asks it).
    public var isLive: Bool { probing.load(ordering: .relaxed) > 0 }

    private let probing = Atomic<Int>(0)

    /// Whether the cluster can serve, and if not why (a readiness probe's answer).
    public struct Readiness: Sendable, Hashable {
        /// Ready: a primary is known and, with replicas in the URI, a replica is fit or reads
        /// may fall back to the primary.
        public var isReady: Bool
        /// Why it is not ready; `nil` when it is.
        public var reason: String?
    }

    /// Whether the cluster can serve now: ready when every host had its first probe, a primary
    /// is known and — when the cluster has other hosts — at least one replica is fit for token-less
    /// reads or `fallbackToPrimary` allows the primary to serve them.
    /// - Parameters:
    ///   - maximumLagBytes: The replica hook's byte limit. Default 16 MiB.
    ///   - maximumLag: The replica hook's time limit. Default 10 seconds.
    ///   - fallbackToPrimary: Whether the replica hook falls back to the primary. Default `true`.
    /// - Returns: Ready, or not and why.
    public func readiness(
        maximumLagBytes: UInt64? = PostgresTopology.defaultMaximumLagBytes,
        maximumLag: Duration? = PostgresTopology.defaultMaximumLag,
        fallbackToPrimary: Bool = true
    ) -> Readiness {
        if let round = firstRound.withLock({ $0 }) {
            if !round.resolved { return Readiness(isReady: false, reason: "the cluster's hosts have not been looked up yet") }
            if !round.unprobed.isEmpty {
                return Readiness(isReady: false, reason: "the first probe of \(round.unprobed.count) host(s) has not finished")
            }
        }
        let snapshot = self.snapshot
        guard snapshot.primary != nil else {
            return Readiness(isReady: false, reason: "no healthy primary among \(snapshot.hosts.count) host(s)")
        }
        let replicasConfigured = snapshot.hosts.count > 1
        if replicasConfigured, !fallbackToPrimary,
           fitReplicas(snapshot, maximumLagBytes: maximumLagBytes, maximumLag: maximumLag, position: nil).isEmpty {
            return Readiness(isReady: false, reason: "no replica is fit and fallbackToPrimary is off")
        }
        return Readiness(isReady: true, reason: nil)
    }

    /// Probes every host now, concurrently, and updates the snapshot — with a changing
    /// ``DBHostSource``, after looking the hosts up (``refreshHosts()``). When the topology is not
    /// running (``isLive`` is false), the round's connections are closed at its end: a topology
    /// only ever refreshed by hand leaves no connection open.
    public func refresh() async {
        refreshing.add(1, ordering: .relaxed)
        if case .changing = hostSource.kind { await refreshHosts() }
        let endpoints = state.withLock { $0.hosts.map(\.endpoint) }
        await withTaskGroup(of: (PostgresEndpoint, Result<Probe, any Error>).self) { group in
            for endpoint in endpoints {
                group.addTask { (endpoint, await self.probe(endpoint)) }
            }
            // Each host's entry as soon as its probe ends: a frozen host delays no other.
            for await (endpoint, result) in group { apply([endpoint: result]) }
        }
        // The last refresh of a topology that does not run closes the connections; one still
        // running shares them.
        if refreshing.subtract(1, ordering: .relaxed).newValue == 0, !isLive { await closeProbeConnections() }
    }

    private let refreshing = Atomic<Int>(0)

    /// Probes `endpoints` now, concurrently, and updates their entries as each answers (for the
    /// read-your-own-writes wait). Each probe has the full ``Configuration/probeTimeout``: a
    /// shorter one would close the host's shared probe connection on a merely slow answer.
    func refreshForPosition(_ endpoints: [PostgresEndpoint]) async {
        await withTaskGroup(of: (PostgresEndpoint, Result<Probe, any Error>).self) { group in
            for endpoint in endpoints {
                group.addTask { (endpoint, await self.probe(endpoint)) }
            }
            for await (endpoint, result) in group { apply([endpoint: result], background: false) }
        }
    }

    /// Probes each host every ``Configuration/probeInterval`` (more often while no primary is
    /// known: ``Configuration/failoverProbeInterval``), each on its own schedule, until
    /// the task is cancelled or a graceful shutdown begins; then closes its probe connections.
    /// With a changing ``DBHostSource`` it also looks the hosts up every interval of the
    /// source (every second at most while none is known): a host that appears gets a probe
    /// schedule of its own, one that vanishes loses it.
    /// - Throws: `DBError.Code.invalidConfiguration` when the topology runs already.
    public func run() async throws {
        let (starts, starter) = AsyncStream.makeStream(of: PostgresEndpoint.self)
        let alreadyRunning = probeLoopStarter.withLock { current -> Bool in
            guard current == nil else { return true }
            current = starter
            return false
        }
        if alreadyRunning {
            throw DBError(.invalidConfiguration, "this PostgresTopology runs already: run it once (one ServiceGroup)")
        }
        probing.add(1, ordering: .relaxed)
        defer { probing.subtract(1, ordering: .relaxed) }
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                if case .changing(let interval, _) = self.hostSource.kind {
                    group.addTask { await self.lookUpHosts(every: interval) }
                }
                self.startProbeLoops(for: self.snapshot.hosts.map(\.endpoint))
                for await endpoint in starts {  // ends when the task is cancelled
                    group.addTask { await self.probeLoop(endpoint) }
                }
            }
        }
        probeLoopStarter.withLock { $0 = nil }
        starter.finish()
        // Hosts yielded but never started (the stream ended first) must get a loop next run.
        probeLoops.withLock { $0.removeAll() }
        await closeProbeConnections()
    }

    /// Starts a probe schedule for each of `endpoints` that has none, when ``run()`` runs.
    private func startProbeLoops(for endpoints: [PostgresEndpoint]) {
        guard let starter = probeLoopStarter.withLock({ $0 }) else { return }
        for endpoint in endpoints where probeLoops.withLock({ $0.insert(endpoint).inserted }) {
            starter.yield(endpoint)
        }
    }

    /// Probes `endpoint` on its schedule while it is one of the hosts and the task runs.
    private func probeLoop(_ endpoint: PostgresEndpoint) async {
        var fast = configuration.failoverProbeInterval
        // Checked and given up under the loops' lock, so a host that comes back as its loop
        // ends gets a new loop.
        while probeLoops.withLock({ loops in
            guard !Task.isCancelled, state.withLock({ $0.hosts.contains { $0.endpoint == endpoint } }) else {
                loops.remove(endpoint)
                return false
            }
            return true
        }) {
            apply([endpoint: await probe(endpoint)])
            try? await Task.sleep(for: nextProbeDelay(&fast))
        }
        // A probe that was connecting when its host left may have kept its connection.
        if !state.withLock({ $0.hosts.contains { $0.endpoint == endpoint } }),
           let connection = probeConnections.withLock({ $0.removeValue(forKey: endpoint) }) {
            try? await connection.close()
        }
    }

    /// Looks the hosts up every `interval` — every second at most while none is known — until
    /// the task is cancelled.
    private func lookUpHosts(every interval: Duration) async {
        while !Task.isCancelled {
            await refreshHosts()
            try? await Task.sleep(for: snapshot.hosts.isEmpty ? min(interval, .seconds(1)) : interval)
        }
    }

    /// Looks the hosts up now, for a changing ``DBHostSource``, and applies the answer: hosts
    /// that appear are added (unknown until probed, and probed on a schedule of their own while
    /// ``run()`` runs); hosts that vanish are removed — no session is routed there any more,
    /// and the hooks tell each connect to drain its engine for them. A lookup that fails or
    /// finds no host changes nothing and is logged at warning level. Does nothing for a fixed
    /// source.
    public func refreshHosts() async {
        guard case .changing(_, let lookUp) = hostSource.kind else { return }
        let ticket = lookupTickets.add(1, ordering: .relaxed).newValue
        let found: [PostgresEndpoint]
        do {
            found = try await lookUp(url)
        } catch {
            logger.warning("could not look up the cluster's hosts; keeping the previous ones", metadata: [
                "error.message": "\((error as? DBError)?.message ?? String(describing: error))", "error.type": "\(type(of: error))",
            ])
            return
        }
        guard !found.isEmpty else {
            logger.warning("the host source returned no host; keeping the previous ones")
            return
        }
        // The probe connections of hosts that left, closed (awaited: PostgresNIO wants a
        // connection closed before it is freed).
        for connection in applyHosts(found, ticket: ticket) { try? await connection.close() }
    }

    /// Numbers the lookups, so an older answer never replaces a newer one.
    private let lookupTickets = Atomic<Int>(0)
    /// The ticket of the lookup applied last, and how many lookups in a row missed each host
    /// still listed (see `lookupsBeforeRemoval`): kept out of the snapshot, which every session
    /// copies. Taken before `state`, never inside it.
    private let lookups = Mutex<(lastApplied: Int, missed: [PostgresEndpoint: Int])>((0, [:]))
    /// A host must be missing from this many lookups in a row before it is removed: one short
    /// answer (a flaky resolver) drains nothing.
    static let lookupsBeforeRemoval = 2

    /// Makes `found` the hosts, keeping what is known of those that stay.
    /// - Returns: The probe connections of the hosts that left, to close.
    private func applyHosts(_ found: [PostgresEndpoint], ticket: Int) -> [PostgresConnection] {
        var unique: [PostgresEndpoint] = []
        for endpoint in found where !unique.contains(endpoint) { unique.append(endpoint) }
        let firstLookup = firstRound.withLock { $0.map { !$0.resolved } ?? false }
        let (added, removed) = lookups.withLock { lookups in state.withLock { snapshot -> ([PostgresEndpoint], [PostgresEndpoint]) in
            guard ticket > lookups.lastApplied else { return ([], []) }  // a newer answer is in
            lookups.lastApplied = ticket
            let current = snapshot.hosts.map(\.endpoint)
            let added = unique.filter { !current.contains($0) }
            var removed: [PostgresEndpoint] = []
            for endpoint in current where !unique.contains(endpoint) {
                lookups.missed[endpoint, default: 0] += 1
                if firstLookup || lookups.missed[endpoint]! >= Self.lookupsBeforeRemoval { removed.append(endpoint) }
            }
            for endpoint in unique + removed { lookups.missed[endpoint] = nil }
            guard !added.isEmpty || !removed.isEmpty else { return ([], []) }
            let known = Dictionary(uniqueKeysWithValues: snapshot.hosts.map { ($0.endpoint, $0) })
            let kept = snapshot.hosts.map(\.endpoint).filter { !removed.contains($0) && !unique.contains($0) }
            snapshot.hosts = (unique + kept).map { known[$0] ?? Self.newHost($0) }
            let comeBack = Set(added.map(\.description))
            snapshot.departed.removeAll { comeBack.contains($0) }
            snapshot.departed += removed.map(\.description)
            snapshot.departed.removeFirst(max(0, snapshot.departed.count - Snapshot.departedLimit))
            // Under the state's lock: a concurrent change cannot destroy gauges just made.
            metrics.setHosts(adding: added, removing: removed)
            return (added, removed)
        } }
        firstRound.withLock { round in
            guard round != nil else { return }
            if !round!.resolved {
                round!.resolved = true
                round!.unprobed = Set(unique)
            }
            round!.unprobed.subtract(removed)  // a host that left before its first probe
        }
        markProbed([])  // completes the first round when nothing is left to probe
        guard !added.isEmpty || !removed.isEmpty else { return [] }
        logger.info("the cluster's hosts changed", metadata: [
            "contextdb.hosts.added": "\(added.map(\.description).joined(separator: ","))",
            "contextdb.hosts.removed": "\(removed.map(\.description).joined(separator: ","))",
        ])
        startProbeLoops(for: added)
        return probeConnections.withLock { connections in removed.compactMap { connections.removeValue(forKey: $0) } }
    }

    /// The wait before a host's next probe: ``Configuration/probeInterval`` while a primary is
    /// known; else `fast`, which then doubles up to the smaller of `probeInterval` and 1 s.
    private func nextProbeDelay(_ fast: inout Duration) -> Duration {
        let normal = configuration.probeInterval
        guard snapshot.primary == nil else {
            fast = configuration.failoverProbeInterval
            return normal
        }
        defer { fast = min(fast * 2, min(normal, .seconds(1))) }
        return min(fast, normal)
    }

    /// Closes the probe connections the probes keep between rounds.
    private func closeProbeConnections() async {
        let connections = probeConnections.withLock { connections in
            defer { connections.removeAll() }
            return Array(connections.values)
        }
        for connection in connections { try? await connection.close() }
    }

    /// Marks a host down at once — a session could not lease from it. The next good probe
    /// brings it back. A host that was healthy is logged as `host down` at warning level.
    /// - Parameters:
    ///   - host: The host, as `"host:port"`.
    ///   - reason: Why, for ``HostStatus/lastError``.
    public func markSuspect(_ host: String, reason: String) {
        let host = (try? PostgresEndpoint(parsing: host).description) ?? host  // `db1` is `db1:5432`
        let wentDown = state.withLock { snapshot -> PostgresTopology.HostStatus? in
            guard let index = snapshot.hosts.firstIndex(where: { $0.endpoint.description == host }) else { return nil }
            let wasHealthy = snapshot.hosts[index].isHealthy
            snapshot.hosts[index].isHealthy = false
            snapshot.hosts[index].consecutiveFailures = max(snapshot.hosts[index].consecutiveFailures, configuration.failuresBeforeDown)
            snapshot.hosts[index].lastError = reason
            metrics.publish(snapshot.hosts[index])
            return wasHealthy ? snapshot.hosts[index] : nil
        }
        if let wentDown { logHealthChange(wentDown, detectedBy: "lease") }
    }

    /// Logs a host that went down (warning) or came up or changed role (info); the keys are
    /// listed in "Observing ContextDB".
    private func logHealthChange(_ host: HostStatus, detectedBy: String) {
        var metadata: Logger.Metadata = [
            "db.host": "\(host.endpoint)", "contextdb.host.role": "\(host.role.rawValue)",
            "contextdb.host.health": "\(host.isHealthy ? "healthy" : "down")", "contextdb.host.detected_by": "\(detectedBy)",
        ]
        if host.isHealthy {
            logger.info("host up", metadata: metadata)
        } else {
            metadata["error.message"] = "\(host.lastError ?? "")"
            logger.warning("host down", metadata: metadata)
        }
    }

    // MARK: - Probing

    struct Probe: Sendable {
        var isReplica: Bool
        var position: PostgresLSN?
        var lagSeconds: Double?
        var walReceiverStatus: String?
    }

    /// A probe that got no answer within ``Configuration/probeTimeout``: the host is down at once.
    struct ProbeTimedOut: Error, CustomStringConvertible {
        let timeout: Duration
        var description: String { "no answer within \(timeout): the host is frozen or unreachable" }
    }

    /// Role, position, replay lag in seconds (0 when everything received is replayed, so an idle
    /// primary is no lag) and the WAL receiver's status (PostgreSQL docs, "Recovery Information
    /// Functions" and "pg_stat_wal_receiver"), the view read once: `stopped` when no receiver
    /// runs, and `''` when one runs but the probing role may not read its status (it lacks
    /// `pg_read_all_stats`).
    private static let probeQuery: PostgresQuery = """
        SELECT pg_is_in_recovery(),
               (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
               CASE WHEN pg_is_in_recovery() THEN
                    CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
                         ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END
               END::float8,
               CASE WHEN pg_is_in_recovery()
                    THEN coalesce((SELECT coalesce(status, '') FROM pg_stat_wal_receiver), 'stopped') END
        """

    /// Probes one host: connect (reusing its probe connection) and query, together bounded by
    /// ``Configuration/probeTimeout``. A hung probe's connection is closed at the deadline, so the
    /// probe ends on time whatever the host does.
    private func probe(_ endpoint: PostgresEndpoint) async -> Result<Probe, any Error> {
        let timeout = configuration.probeTimeout
        let deadline = ContinuousClock.now + timeout
        var used: PostgresConnection?
        do {
            let connection = try await probeConnection(to: endpoint, deadline: deadline)
            used = connection
            return .success(try await query(endpoint, on: connection, deadline: deadline))
        } catch {
            // A failed or hung probe connection is never reused; another probe's newer one stays.
            if let used {
                probeConnections.withLock { connections in
                    if connections[endpoint] === used { connections[endpoint] = nil }
                }
                try? await used.close()
            }
            return .failure(ContinuousClock.now >= deadline ? ProbeTimedOut(timeout: timeout) : error)
        }
    }

    /// The host's probe connection: the kept one while it is open, else a new one.
    private func probeConnection(to endpoint: PostgresEndpoint, deadline: ContinuousClock.Instant) async throws -> PostgresConnection {
        if let existing = probeConnections.withLock({ $0[endpoint] }), !existing.isClosed { return existing }
        var configuration = try url.connectionConfiguration(for: endpoint)
        configuration.options.connectTimeout = .nanoseconds(Self.nanoseconds(ContinuousClock.now.duration(to: deadline)))
        let connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
        // A concurrent probe (`refresh()` beside `run()`) may have opened one meanwhile: keep
        // that one — another probe may be querying it — and close this unused one.
        let kept = probeConnections.withLock { connections -> PostgresConnection? in
            if let existing = connections[endpoint], !existing.isClosed { return existing }
            connections[endpoint] = connection
            return nil
        }
        guard let kept else { return connection }
        try? await connection.close()
        return kept
    }

    private func query(_ endpoint: PostgresEndpoint, on connection: PostgresConnection, deadline: ContinuousClock.Instant) async throws -> Probe {
        let remaining = ContinuousClock.now.duration(to: deadline)
        guard remaining > .zero else { throw ProbeTimedOut(timeout: .zero) }  // probe() names the timeout
        let row = try await connection.guardedQuery(
            Self.probeQuery, host: endpoint.description, logger: logger, timeout: remaining, grace: .zero
        ).first
        guard let (isReplica, position, lag, receiver) = try row?.decode((Bool, String?, Double?, String?).self) else {
            throw DBError(.queryFailed, "the probe returned no row", host: endpoint.description)
        }
        return Probe(
            isReplica: isReplica, position: position.flatMap(PostgresLSN.init), lagSeconds: lag, walReceiverStatus: receiver
        )
    }

    private static func nanoseconds(_ duration: Duration) -> Int64 {
        max(1, duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000)
    }

    /// Updates the snapshot with probe results. `background`: from the probe schedule (only
    /// those count for the two-probes-in-a-row time-lag rule).
    /// Waits until every host has answered or failed its first probe, at most `timeout`: a
    /// session created right after start-up is routed on probe results, not on an empty
    /// snapshot. Returns at once afterwards.
    func waitForFirstRound(timeout: Duration) async {
        guard firstRound.withLock({ $0 != nil }) else { return }
        await park(
            timeout: timeout,
            register: { id, continuation in
                self.firstRound.withLock { round -> Bool in
                    guard round != nil, !Task.isCancelled else { return false }
                    round!.waiters[id] = continuation
                    return true
                }
            },
            unregister: { id in self.firstRound.withLock { $0?.waiters.removeValue(forKey: id) } }
        )
    }

    /// Parks the calling task until what it waits for resumes it, at most `timeout`, or until
    /// it is cancelled. `register` parks the continuation under its lock, or returns `false`
    /// when the wait is over already or the task is cancelled (checked under the same lock as
    /// `unregister`, so a cancellation is never missed); `unregister` takes it back on a
    /// timeout or cancellation.
    private func park(
        timeout: Duration,
        register: @escaping @Sendable (Int, CheckedContinuation<Void, Never>) -> Bool,
        unregister: @escaping @Sendable (Int) -> CheckedContinuation<Void, Never>?
    ) async {
        let id = nextWaiter.add(1, ordering: .relaxed).oldValue
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: timeout) }
            group.addTask {
                await withTaskCancellationHandler {
                    await withCheckedContinuation { continuation in
                        if !register(id, continuation) { continuation.resume() }
                    }
                } onCancel: {
                    unregister(id)?.resume()
                }
            }
            await group.next()
            group.cancelAll()
        }
    }

    /// Waits until a primary is known — at most `timeout`, and not when
    /// ``Configuration/maximumPrimaryWaiters`` sessions already wait.
    /// - Returns: Whether a primary is known now, or why not.
    func waitForPrimary(timeout: Duration) async -> PrimaryWait {
        guard snapshot.primary == nil else { return .found }
        guard primaryWaiters.withLock({ $0.count < configuration.maximumPrimaryWaiters }) else { return .tooManyWaiting }
        await park(
            timeout: timeout,
            register: { id, continuation in
                // The waiters' lock, then the state's; `apply` takes them one at a time.
                self.primaryWaiters.withLock { waiters -> Bool in
                    guard self.snapshot.primary == nil, !Task.isCancelled else { return false }
                    waiters[id] = continuation
                    return true
                }
            },
            unregister: { id in self.primaryWaiters.withLock { $0.removeValue(forKey: id) } }
        )
        if snapshot.primary != nil { return .found }
        return Task.isCancelled ? .cancelled : .timedOut
    }

    /// How many sessions wait for a primary now (see ``Configuration/primaryWaitTimeout``): 0
    /// whenever one is known. A session leaves the count when a primary is found, when its wait
    /// times out, or when its task is cancelled.
    public var sessionsWaitingForPrimary: Int { primaryWaiters.withLock { $0.count } }

    /// How a wait for a primary ended.
    enum PrimaryWait {
        case found, timedOut, tooManyWaiting, cancelled
    }

    /// Wakes every session waiting for a primary, once one is known.
    private func wakePrimaryWaiters() {
        guard snapshot.primary != nil else { return }
        let waiters = primaryWaiters.withLock { waiters in
            defer { waiters.removeAll() }
            return Array(waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Records that `endpoints` had a probe; completes the first round when none is left.
    private func markProbed(_ endpoints: some Sequence<PostgresEndpoint>) {
        let waiters = firstRound.withLock { round -> [CheckedContinuation<Void, Never>] in
            guard round != nil else { return [] }
            round!.unprobed.subtract(endpoints)
            guard round!.resolved, round!.unprobed.isEmpty else { return [] }
            defer { round = nil }
            return Array(round!.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    private func apply(_ results: [PostgresEndpoint: Result<Probe, any Error>], background: Bool = true) {
        defer {
            markProbed(results.keys)
            wakePrimaryWaiters()
        }
        var unprivilegedWarning = false
        let changes = state.withLock { snapshot -> [HostStatus] in
            var changes: [HostStatus] = []
            for index in snapshot.hosts.indices {
                let endpoint = snapshot.hosts[index].endpoint
                guard let result = results[endpoint] else { continue }
                var host = snapshot.hosts[index]
                let before = (host.role, host.isHealthy)
                switch result {
                case .success(let probe):
                    host.role = probe.isReplica ? .replica : .primary
                    host.isHealthy = true
                    host.consecutiveFailures = 0
                    host.position = probe.position
                    if background { host.previousLagSeconds = host.lagSeconds }
                    host.lagSeconds = probe.lagSeconds
                    host.walReceiverStatus = probe.walReceiverStatus == "" ? nil : probe.walReceiverStatus
                    if probe.walReceiverStatus == "", !warnedUnprivileged.exchange(true, ordering: .relaxed) {
                        unprivilegedWarning = true
                    }
                    host.lastError = nil
                case .failure(let error as ProbeTimedOut):
                    // No answer at all: down now, not after more probes of the same length.
                    host.consecutiveFailures = max(host.consecutiveFailures + 1, configuration.failuresBeforeDown)
                    host.isHealthy = false
                    host.lastError = error.description
                case .failure(let error):
                    host.consecutiveFailures += 1
                    host.isHealthy = host.consecutiveFailures < configuration.failuresBeforeDown && host.role != .unknown
                    host.lastError = (error as? DBError)?.message ?? PostgresEngine.explain(error, host: endpoint.description)
                }
                if before != (host.role, host.isHealthy) {
                    changes.append(host)
                }
                snapshot.hosts[index] = host
            }
            // A replica's byte lag against the primary's latest position, when the replica's own
            // probe lands (or it has none yet): not against a replica position older than the
            // primary's, which would overstate the lag by one probe interval of WAL.
            let primaryPosition = snapshot.primary?.position
            for index in snapshot.hosts.indices where snapshot.hosts[index].role == .replica {
                var ownProbe = false
                if case .success = results[snapshot.hosts[index].endpoint] { ownProbe = true }
                guard ownProbe || primaryPosition == nil || snapshot.hosts[index].lagBytes == nil else { continue }
                guard let primaryPosition, let position = snapshot.hosts[index].position else {
                    snapshot.hosts[index].lagBytes = nil
                    continue
                }
                snapshot.hosts[index].lagBytes = primaryPosition.bytes(since: position)
            }
            for host in snapshot.hosts where results[host.endpoint] != nil || host.role == .replica {
                metrics.publish(host)
            }
            return changes
        }
        for host in changes { logHealthChange(host, detectedBy: "probe") }
        if unprivilegedWarning {
            logger.warning(
                "the probing role may not read pg_stat_wal_receiver's status, so a replica that lost its primary is not detected; grant it pg_monitor"
            )
        }
    }
}

/// The topology's metrics: per host, its health and (for a replica) its lag; per connect,
/// routing decisions and the read-your-own-writes wait.
final class PostgresTopologyMetrics: Sendable {
    private let factory: any MetricsFactory
    private let hosts: Mutex<[PostgresEndpoint: (health: Gauge, lagBytes: Gauge, lagSeconds: Gauge)]>

    init(factory: any MetricsFactory, endpoints: [PostgresEndpoint]) {
        self.factory = factory
        self.hosts = Mutex([:])
        setHosts(adding: endpoints, removing: [])
    }

    /// Makes the gauges of hosts that joined and destroys those of hosts that left.
    func setHosts(adding added: [PostgresEndpoint], removing removed: [PostgresEndpoint]) {
        let destroyed = hosts.withLock { hosts in
            for endpoint in added where hosts[endpoint] == nil {
                let dimensions = Self.dimensions(endpoint)
                hosts[endpoint] = (
                    Gauge(label: DBMetricName.hostHealth, dimensions: dimensions, factory: factory),
                    Gauge(label: DBMetricName.replicaLag, dimensions: dimensions + [("unit", "bytes")], factory: factory),
                    Gauge(label: DBMetricName.replicaLag, dimensions: dimensions + [("unit", "seconds")], factory: factory)
                )
            }
            return removed.compactMap { hosts.removeValue(forKey: $0) }
        }
        for gauges in destroyed { [gauges.health, gauges.lagBytes, gauges.lagSeconds].forEach { $0.destroy() } }
    }

    static func dimensions(_ endpoint: PostgresEndpoint) -> [(String, String)] {
        [("db.system.name", PostgresEngine.systemName), ("server.address", endpoint.host), ("server.port", String(endpoint.port))]
    }

    /// Publishes a host's health and, for a replica, its lag.
    func publish(_ host: PostgresTopology.HostStatus) {
        guard let gauges = hosts.withLock({ $0[host.endpoint] }) else { return }
        gauges.health.record(host.isHealthy ? 1 : 0)
        guard host.role == .replica else { return }
        if let bytes = host.lagBytes { gauges.lagBytes.record(Int64(clamping: bytes)) }
        if let seconds = host.lagSeconds { gauges.lagSeconds.record(seconds) }
    }

    /// The routing counters and wait timers made so far, by their dimensions: made once each.
    private let decisions = Mutex<[String: Counter]>([:])
    private let waits = Mutex<[String: Timer]>([:])

    /// Counts a routing decision for a connect's session (`role`: `primary` or `replica`;
    /// `reason`: `policy`, `token_wait`, `token_primary`, `fallback_primary`, `scope` or `failover`).
    func decided(connect: String, role: String, reason: String) {
        _ = waitTimer(connect)  // made with the connect's first decision: exported before its first wait
        let key = "\(connect)\u{0}\(role)\u{0}\(reason)"
        let counter = decisions.withLock { counters in
            if let counter = counters[key] { return counter }
            let counter = Counter(
                label: DBMetricName.routingDecisions,
                dimensions: [
                    ("db.system.name", PostgresEngine.systemName), ("db.client.connection.pool.name", connect),
                    ("contextdb.routing.role", role), ("contextdb.routing.reason", reason),
                ],
                factory: factory
            )
            counters[key] = counter
            return counter
        }
        counter.increment()
    }

    /// Records how long a read waited for a replica to reach the request's position.
    func waited(_ duration: Duration, connect: String) {
        waitTimer(connect).record(duration: duration)
    }

    private func waitTimer(_ connect: String) -> Timer {
        waits.withLock { timers in
            if let timer = timers[connect] { return timer }
            let timer = Timer(
                label: DBMetricName.consistencyWaitTime,
                dimensions: [("db.system.name", PostgresEngine.systemName), ("db.client.connection.pool.name", connect)],
                factory: factory
            )
            timers[connect] = timer
            return timer
        }
    }
}
