import ContextDB
import Logging
import Synchronization

/// How a replica hook orders the fit replicas.
public enum DBReplicaPolicy: Sendable, Hashable {
    /// Each new session takes the next replica in turn. The default.
    case roundRobin
    /// A random replica per session.
    case random
    /// The replica with the fewest WAL bytes to replay.
    case leastLag
}

extension PostgresTopology {
    /// A `chooseHost` hook that binds sessions to the current primary.
    ///
    /// It follows promotion: after a failover the new primary is used as soon as a probe has
    /// seen it (within ``Configuration/probeInterval`` plus one probe), without a restart, and
    /// the engines of hosts that stopped being the primary are drained — closed once their
    /// sessions have given their connections back (`DBHostChoice.retiresOtherHosts`). Right after start-up, before every host has
    /// had its first probe, it waits for that round (at most ``Configuration/probeTimeout``).
    /// While no primary is known (a failover under way), it waits up to
    /// ``Configuration/primaryWaitTimeout`` for one — woken by the probe that finds it; a
    /// session whose task is cancelled meanwhile stops waiting and throws `CancellationError`.
    /// A session it cannot route fails with `DBError.Code.noHostAvailable`, logged
    /// at warning level.
    /// - Returns: The hook, for `DBConnect(chooseHost:)`.
    public func primaryHook() -> DBConnect<PostgresEngine>.ChooseHost {
        primaryHook(for: PostgresEngine.self)
    }

    /// ``primaryHook()`` for a connect of another PostgreSQL engine (libpq's, say).
    /// - Parameter engine: The connect's engine type.
    /// - Returns: The hook, for `DBConnect(chooseHost:)`.
    public func primaryHook<Engine: DatabaseEngine>(for engine: Engine.Type) -> DBConnect<Engine>.ChooseHost {
        { [self] request in
            let connect = request.connect
            await waitForFirstRound(timeout: configuration.probeTimeout)
            var snapshot = self.snapshot
            var waited: String?
            if snapshot.primary == nil, configuration.primaryWaitTimeout > .zero {
                let started = ContinuousClock.now
                switch await waitForPrimary(timeout: configuration.primaryWaitTimeout) {
                case .found: break
                case .timedOut: waited = " after waiting \(started.duration(to: .now)) for one (primaryWaitTimeout)"
                case .tooManyWaiting: waited = ", and \(configuration.maximumPrimaryWaiters) sessions wait for one already (maximumPrimaryWaiters)"
                case .cancelled: throw CancellationError()  // the request went away: nothing to route
                }
                snapshot = self.snapshot
            }
            guard let primary = snapshot.primary else {
                let error = DBError(
                    .noHostAvailable,
                    "no healthy primary among \(describe(snapshot))\(waited ?? ""); is the topology service running, and is a primary up?",
                    connect: connect.label
                )
                logger.warning("no host for a session", metadata: ["db.connect": "\(connect.label)", "error.message": "\(error.message)"])
                throw error
            }
            let host = primary.endpoint.description
            let former = connect.engineHosts.filter { $0 != host }
            if !former.isEmpty {
                logger.info("the connect drains the engines of former primaries", metadata: [
                    "db.connect": "\(connect.label)", "db.hosts": "\(former.joined(separator: ","))", "db.primary": "\(host)",
                ])
            }
            logRoutingDecision(connect: connect.label, host: host, role: "primary", reason: "policy")
            metrics.decided(connect: connect.label, role: "primary", reason: "policy")
            return DBHostChoice(
                host, retiresOtherHosts: true, role: "primary", reason: "policy", onLeaseFailure: failedOver(connect.label, hosts: [host])
            )
        }
    }

    /// A `chooseHost` hook that binds sessions to a replica.
    ///
    /// A replica is fit when it is healthy, its WAL receiver is streaming (a replica that lost
    /// its primary serves no token-less read), it lags at most `maximumLagBytes` and `maximumLag`
    /// (see ``PostgresTopology/HostStatus/unfitReason(maximumLagBytes:maximumLag:)``), and — when
    /// the request carries a read-your-own-writes position (`DBHostRequest.consistencyToken`)
    /// — has replayed up to it. When no replica is fit for that position, the hook re-probes the
    /// replicas for up to `readYourWritesWait`; then it uses the primary. The fit replicas,
    /// ordered by `policy`, then the primary (with `fallbackToPrimary`) are the session's
    /// failover candidates: a replica that refuses the lease is marked suspect and the next one
    /// tried. Give the replica connect `DBSessionOptions(readOnly: true)`, so a session that
    /// falls back to the primary still cannot write.
    /// - Parameters:
    ///   - policy: How to spread sessions over fit replicas. Default round robin.
    ///   - maximumLagBytes: The most WAL bytes a replica may lag; `nil` for no limit. Default
    ///     16 MiB (``defaultMaximumLagBytes``).
    ///   - maximumLag: The most a replica's replay may lag in time; `nil` for no limit. Default
    ///     10 seconds (``defaultMaximumLag``).
    ///   - fallbackToPrimary: Use the primary when no replica is fit. Default `true`.
    ///   - readYourWritesWait: The longest to wait for a replica to reach the request's position.
    ///     Default 500 ms. A re-probe already running finishes first, so a replica that stopped
    ///     answering and is not marked down yet can stretch the wait by up to one probe timeout.
    /// When the read must go to the primary and none is known, it waits as ``primaryHook()``
    /// does (``Configuration/primaryWaitTimeout``).
    /// Inside `withPrimaryReads { }` it routes to the primary (reason `scope`); inside
    /// `withMaxStaleness(_:) { }` the scope's limit replaces `maximumLag`.
    /// Like ``primaryHook()``, it waits for the first probe round right after start-up, and a
    /// session it cannot route fails with `DBError.Code.noHostAvailable`, logged at
    /// warning level.
    /// - Returns: The hook, for `DBConnect(chooseHost:)`.
    public func replicaHook(
        policy: DBReplicaPolicy = .roundRobin,
        maximumLagBytes: UInt64? = PostgresTopology.defaultMaximumLagBytes,
        maximumLag: Duration? = PostgresTopology.defaultMaximumLag,
        fallbackToPrimary: Bool = true,
        readYourWritesWait: Duration = .milliseconds(500)
    ) -> DBConnect<PostgresEngine>.ChooseHost {
        replicaHook(
            for: PostgresEngine.self, policy: policy, maximumLagBytes: maximumLagBytes, maximumLag: maximumLag,
            fallbackToPrimary: fallbackToPrimary, readYourWritesWait: readYourWritesWait
        )
    }

    /// ``replicaHook(policy:maximumLagBytes:maximumLag:fallbackToPrimary:readYourWritesWait:)``
    /// for a connect of another PostgreSQL engine (libpq's, say), whose consistency tokens are
    /// WAL positions too.
    /// - Parameters:
    ///   - engine: The connect's engine type.
    ///   - policy: How to spread sessions over fit replicas. Default round robin.
    ///   - maximumLagBytes: The most WAL bytes a replica may lag. Default 16 MiB.
    ///   - maximumLag: The most replay lag in time. Default 10 seconds.
    ///   - fallbackToPrimary: Use the primary when no replica is fit. Default `true`.
    ///   - readYourWritesWait: The longest to wait for a replica to reach the request's position. Default 500 ms.
    /// - Returns: The hook, for `DBConnect(chooseHost:)`.
    public func replicaHook<Engine: DatabaseEngine>(
        for engine: Engine.Type,
        policy: DBReplicaPolicy = .roundRobin,
        maximumLagBytes: UInt64? = PostgresTopology.defaultMaximumLagBytes,
        maximumLag: Duration? = PostgresTopology.defaultMaximumLag,
        fallbackToPrimary: Bool = true,
        readYourWritesWait: Duration = .milliseconds(500)
    ) -> DBConnect<Engine>.ChooseHost {
        { [self] request in
            let connect = request.connect
            await waitForFirstRound(timeout: configuration.probeTimeout)
            if request.readPreference.primaryOnly { return try primaryForReads(connect) }
            let lagLimit = request.readPreference.maximumStaleness ?? maximumLag
            let position = request.consistencyToken.flatMap(PostgresLSN.init)
            var snapshot = self.snapshot
            var fit = fitReplicas(snapshot, maximumLagBytes: maximumLagBytes, maximumLag: lagLimit, position: position)
            let clock = ContinuousClock()
            let started = clock.now
            let waits = fit.isEmpty && position != nil && readYourWritesWait > .zero && !snapshot.replicas.isEmpty
            if waits {
                var pause = Duration.milliseconds(2)
                while fit.isEmpty, clock.now - started < readYourWritesWait {
                    await refreshForPosition(snapshot.replicas.map(\.endpoint))
                    snapshot = self.snapshot
                    fit = fitReplicas(snapshot, maximumLagBytes: maximumLagBytes, maximumLag: lagLimit, position: position)
                    if fit.isEmpty {
                        try await Task.sleep(for: min(pause, readYourWritesWait - (clock.now - started)))
                        pause = min(pause * 2, .milliseconds(50))
                    }
                }
            }
            let waited = clock.now - started
            if fit.isEmpty, fallbackToPrimary, snapshot.primary == nil, configuration.primaryWaitTimeout > .zero {
                // The read must go to the primary and none is known (a failover): wait as a write does.
                if await waitForPrimary(timeout: configuration.primaryWaitTimeout) == .cancelled { throw CancellationError() }
                snapshot = self.snapshot
                fit = fitReplicas(snapshot, maximumLagBytes: maximumLagBytes, maximumLag: lagLimit, position: position)
            }
            var hosts = order(fit, by: policy).map(\.endpoint.description)
            var detail = position.map { "replica at or past \($0)" } ?? "replica"
            if hosts.isEmpty {
                detail = "no fit replica (" + snapshot.hosts.compactMap { host in
                    host.role == .primary ? nil : host.unfitReason(maximumLagBytes: maximumLagBytes, maximumLag: lagLimit)
                        .map { "\(host.endpoint): \($0)" }
                }.joined(separator: "; ") + "), primary"
            }
            if fallbackToPrimary, let primary = snapshot.primary?.endpoint.description, !hosts.contains(primary) {
                hosts.append(primary)
            }
            guard let host = hosts.first else {
                let error = DBError(
                    .noHostAvailable,
                    fallbackToPrimary
                        ? "no replica is fit and no primary is known (\(describe(snapshot)))"
                        : "no replica is fit (\(describe(snapshot))) and fallbackToPrimary is off",
                    connect: connect.label
                )
                logger.warning("no host for a session", metadata: ["db.connect": "\(connect.label)", "error.message": "\(error.message)"])
                throw error
            }
            let toReplica = !fit.isEmpty
            if waits { metrics.waited(waited, connect: connect.label) }
            let role = toReplica ? "replica" : "primary"
            let decision = toReplica
                ? (waits ? "token_wait" : "policy")
                : (position != nil ? "token_primary" : "fallback_primary")
            logRoutingDecision(
                connect: connect.label, host: host, role: role, reason: decision, detail: detail,
                waited: waits ? waited : nil, fallbacks: hosts.dropFirst()
            )
            metrics.decided(connect: connect.label, role: role, reason: decision)
            return DBHostChoice(
                host, fallbacks: Array(hosts.dropFirst()), retiredHosts: departedEngines(of: connect, snapshot), role: role,
                reason: decision, onLeaseFailure: failedOver(connect.label, hosts: hosts)
            )
        }
    }

    /// The byte-lag limit of ``replicaHook(policy:maximumLagBytes:maximumLag:fallbackToPrimary:readYourWritesWait:)``
    /// when none is given: 16 MiB (one WAL segment).
    public static let defaultMaximumLagBytes: UInt64 = 16 * 1024 * 1024
    /// The time-lag limit of ``replicaHook(policy:maximumLagBytes:maximumLag:fallbackToPrimary:readYourWritesWait:)``
    /// when none is given: 10 seconds.
    public static let defaultMaximumLag: Duration = .seconds(10)

    /// The replicas a read may use: fit (see ``HostStatus/unfitReason(maximumLagBytes:maximumLag:)``)
    /// and, with a position, at or past it.
    func fitReplicas(_ snapshot: Snapshot, maximumLagBytes: UInt64?, maximumLag: Duration?, position: PostgresLSN?) -> [HostStatus] {
        snapshot.replicas.filter { replica in
            if let position {
                guard let replayed = replica.position, replayed >= position else { return false }
            }
            return replica.unfitReason(maximumLagBytes: maximumLagBytes, maximumLag: maximumLag) == nil
        }
    }

    func order(_ replicas: [HostStatus], by policy: DBReplicaPolicy) -> [HostStatus] {
        guard replicas.count > 1 else { return replicas }
        switch policy {
        case .roundRobin:
            let start = (turn.add(1, ordering: .relaxed).oldValue & Int.max) % replicas.count
            return Array(replicas[start...] + replicas[..<start])
        case .random:
            return replicas.shuffled()
        case .leastLag:
            return replicas.sorted { ($0.lagBytes ?? .max) < ($1.lagBytes ?? .max) }
        }
    }

    /// What a session does when its lease on one of `hosts` fails: marks the host suspect (not
    /// when the pool was only busy: every connection in use until the lease timeout) and,
    /// when another host follows it in `hosts` (the session moves on), counts a `failover`
    /// decision for the connect with the role of the host that takes over.
    private func failedOver(_ connect: String, hosts: [String]) -> @Sendable (String, DBError) -> Void {
        { [self] host, error in
            // A busy pool says nothing about the host: only a failed connect marks it suspect.
            guard !(error.underlying is PoolExhausted) else { return }
            markSuspect(host, reason: error.message)
            guard let index = hosts.firstIndex(of: host), index + 1 < hosts.count else { return }
            let next = hosts[index + 1]
            let role = snapshot.hosts.first { $0.endpoint.description == next }?.role.rawValue ?? "unknown"
            logger.info("failing over to the next host", metadata: [
                "db.connect": "\(connect)", "db.host": "\(host)", "contextdb.failover.to": "\(next)",
                "contextdb.routing.role": "\(role)", "error.type": "\(error.code)",
            ])
            metrics.decided(connect: connect, role: role, reason: "failover")
        }
    }

    /// The primary for a replica session inside `withPrimaryReads`.
    private func primaryForReads<Engine: DatabaseEngine>(_ connect: DBConnect<Engine>) throws -> DBHostChoice {
        let snapshot = self.snapshot
        guard let primary = snapshot.primary?.endpoint.description else {
            let error = DBError(
                .noHostAvailable, "withPrimaryReads: no healthy primary among \(describe(snapshot))", connect: connect.label
            )
            logger.warning("no host for a session", metadata: ["db.connect": "\(connect.label)", "error.message": "\(error.message)"])
            throw error
        }
        logRoutingDecision(connect: connect.label, host: primary, role: "primary", reason: "scope", detail: "withPrimaryReads")
        metrics.decided(connect: connect.label, role: "primary", reason: "scope")
        return DBHostChoice(
            primary, retiredHosts: departedEngines(of: connect, snapshot), role: "primary", reason: "scope",
            onLeaseFailure: failedOver(connect.label, hosts: [primary])
        )
    }

    /// The hosts that left the cluster for which `connect` still has an engine. Free while no
    /// host ever left; after that, a copy of the connect's hosts per session.
    private func departedEngines<Engine: DatabaseEngine>(of connect: DBConnect<Engine>, _ snapshot: Snapshot) -> [String] {
        guard !snapshot.departed.isEmpty else { return [] }
        let engines = connect.engineHosts
        return snapshot.departed.filter(engines.contains)
    }

    /// The debug line of one routing decision; its keys are listed in "Observing ContextDB".
    private func logRoutingDecision(
        connect: String, host: String, role: String, reason: String, detail: String? = nil,
        waited: Duration? = nil, fallbacks: ArraySlice<String> = []
    ) {
        guard logger.logLevel <= .debug else { return }
        var metadata: Logger.Metadata = [
            "db.connect": "\(connect)", "db.host": "\(host)",
            "contextdb.routing.role": "\(role)", "contextdb.routing.reason": "\(reason)",
        ]
        if let detail { metadata["contextdb.routing.detail"] = "\(detail)" }
        if let waited { metadata["contextdb.consistency.wait_time"] = "\(Double(waited.components.seconds) + Double(waited.components.attoseconds) / 1e18)" }
        if !fallbacks.isEmpty { metadata["contextdb.routing.fallbacks"] = "\(fallbacks.joined(separator: ","))" }
        logger.debug("routing decision", metadata: metadata)
    }

    private func describe(_ snapshot: Snapshot) -> String {
        snapshot.hosts.map { "\($0.endpoint) \($0.role.rawValue)\($0.isHealthy ? "" : " down")" }.joined(separator: ", ")
    }
}
