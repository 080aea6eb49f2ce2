import ContextDB
import ContextDBPostgres
import InMemoryLogging
import Logging
import Foundation
import PostgresNIO
import Synchronization
import MetricsTestKit
import Testing
import TestSupport

/// Routing against the shared test cluster (a primary and two replicas): nothing here stops
/// or pauses a server.
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct RoutingTests {
    static var clusterURL: String { TestCluster.clusterURL() }

    /// Right after start-up the snapshot is empty: a session created then waits for the first
    /// probe round instead of failing with an empty 500.
    @Test func aSessionRightAfterStartUpWaitsForTheFirstProbeRound() async throws {
        let topology = running(try PostgresTopology(url: Self.clusterURL))
        let primary = try running(DBConnect(label: "primary", url: Self.clusterURL, chooseHost: topology.primaryHook()))
        let replica = try running(DBConnect(
            label: "replica", url: Self.clusterURL, options: DBSessionOptions(readOnly: true),
            chooseHost: topology.replicaHook(fallbackToPrimary: false)
        ))
        let (written, read) = try await withDBContext {
            (try await primary.session().queryValue("SELECT NOT pg_is_in_recovery()", as: Bool.self),
             try await replica.session().queryValue("SELECT pg_is_in_recovery()", as: Bool.self))
        }
        #expect(written == true && read == true, "each session reached the right role on the first try")
        await primary.close()
        await replica.close()
    }

    /// Two probes of one host at once (`refresh()` beside `run()`, or two refreshes) share one
    /// probe connection, and neither closes the other's — which failed that probe and marked a
    /// healthy host down.
    @Test func concurrentProbesMarkNoHealthyHostDown() async throws {
        for _ in 0..<20 {
            let topology = running(try PostgresTopology(url: Self.clusterURL))  // its run() probes too
            async let first: Void = topology.refresh()
            async let second: Void = topology.refresh()
            _ = await (first, second)
            let hosts = topology.snapshot.hosts
            #expect(hosts.allSatisfy { $0.isHealthy && $0.lastError == nil }, "\(hosts.map { "\($0.endpoint): \($0.lastError ?? "ok")" })")
        }
    }

    /// A topology nobody runs never gets a probe: the hook gives up after one probe timeout,
    /// with a typed error that says why.
    @Test func aTopologyThatIsNotRunningFailsTheSessionAfterAProbeTimeout() async throws {
        var configuration = PostgresTopology.Configuration()
        configuration.probeTimeout = .milliseconds(300)
        let topology = try PostgresTopology(url: Self.clusterURL, configuration: configuration)
        let primary = try running(DBConnect(label: "primary", url: Self.clusterURL, chooseHost: topology.primaryHook()))
        let error = await expectDBError(.noHostAvailable) {
            try await withDBContext { _ = try await primary.session() }
        }
        #expect(error?.message.contains("is the topology service running") == true)
    }

    @Test func readinessNeedsAProbedPrimaryAndLivenessARunningTopology() async throws {
        let idle = try PostgresTopology(url: TestCluster.clusterURL())
        #expect(!idle.isLive, "not run")
        #expect(idle.readiness().reason?.contains("first probe") == true)
        await idle.refresh()
        #expect(idle.readiness().isReady && idle.readiness().reason == nil)

        let nothing = try PostgresTopology(url: "postgresql://u:p@127.0.0.1:1/db?sslmode=disable&connect_timeout=1")
        await nothing.refresh()
        #expect(nothing.readiness().reason?.contains("no healthy primary") == true)

        let live = running(try PostgresTopology(url: TestCluster.clusterURL()))
        try await eventually("the topology probes") { live.isLive }
    }

    /// A lease that times out on a pool whose connections are all in use says nothing about the
    /// host: the primary stays in routing, and the error says the pool is too small.
    @Test func aBusyPoolDoesNotTakeThePrimaryOutOfRouting() async throws {
        var configuration = PostgresTopology.Configuration()
        configuration.probeInterval = .seconds(60)  // no probe would put a suspect primary back in time
        let topology = running(try PostgresTopology(url: Self.clusterURL, configuration: configuration))
        await topology.refresh()
        do {
            let primary = try running(DBConnect(
                label: "primary", url: Self.clusterURL, maximumConnections: 1, leaseTimeout: .seconds(2),
                chooseHost: topology.primaryHook()
            ))
            try await withDBContext {
                _ = try await primary.session().queryValue("SELECT 1", as: Int.self)  // holds the pool's one connection
                let error = await expectDBError(.connectionFailed) {
                    try await withDBContext(ifActive: .newContext) { _ = try await primary.session().queryValue("SELECT 1", as: Int.self) }
                }
                #expect(error?.message.contains("the pool may be too small") == true, "\(String(describing: error))")
            }
            #expect(topology.snapshot.primary?.endpoint.description == TestCluster.primaryEndpoint, "still the primary")
            await primary.close()
        }
    }

    @Test func theTopologySeesOnePrimaryAndItsReplicas() async throws {
        try await withTopology(url: Self.clusterURL) { topology in
            let snapshot = topology.snapshot
            #expect(snapshot.primary?.endpoint.description == "\(TestCluster.host):\(TestCluster.port)")
            #expect(snapshot.replicas.count >= 2, "the test cluster runs two replicas (scripts/test.sh)")
            #expect(snapshot.hosts.allSatisfy { $0.isHealthy })
            #expect(snapshot.replicas.allSatisfy { $0.lagBytes != nil })
        }
    }

    @Test(arguments: [DBReplicaPolicy.roundRobin, .random, .leastLag])
    func readsSpreadOverReplicasAndNeverWrite(policy: DBReplicaPolicy) async throws {
        try await withTopology(url: Self.clusterURL) { topology in
            let replica = try running(DBConnect(
                label: "replica", url: Self.clusterURL, options: DBSessionOptions(readOnly: true),
                chooseHost: topology.replicaHook(policy: policy, fallbackToPrimary: false)
            ))
            var served: [String: Int] = [:]
            for _ in 0..<40 {
                let port = try await withDBContext {
                    try await replica.session().queryValue("SELECT inet_server_port()", as: Int.self)
                }
                served["\(port ?? 0)", default: 0] += 1
            }
            let replicaPorts = Set(topology.snapshot.replicas.map { "\($0.endpoint.port)" })
            #expect(Set(served.keys).isSubset(of: replicaPorts), "only replicas serve: \(served)")
            if policy != .leastLag {
                #expect(served.count == replicaPorts.count, "\(policy) uses every replica: \(served)")
            }
            await expectDBError(.readOnlySession) {
                try await withDBContext { try await replica.session().execute("CREATE TABLE never_created (id int)") }
            }
            await replica.close()
        }
    }

    @Test func aCustomHookCanReadTheSnapshot() async throws {
        try await withTopology(url: Self.clusterURL) { topology in
            // The user's own handler: the replica with the highest port, say. What it chose is
            // compared, not a later snapshot (a slow probe may have changed that meanwhile).
            let chosen = Mutex<Int?>(nil)
            let connect = try running(DBConnect(label: "custom", url: Self.clusterURL, beforeCreateSession: { connect in
                guard let last = topology.snapshot.replicas.max(by: { $0.endpoint.port < $1.endpoint.port }) else {
                    throw DBError(.noHostAvailable, "the test's hook found no replica")
                }
                chosen.withLock { $0 = last.endpoint.port }
                try connect.changeHost(last.endpoint.description)
            }))
            let port = try await withDBContext {
                try await connect.session().queryValue("SELECT inet_server_port()", as: Int.self)
            }
            #expect(port != nil && port == chosen.withLock { $0 }, "the session runs on the host the hook chose")
            #expect(TestCluster.replicaPorts.contains(port ?? 0))
            await connect.close()
        }
    }

    @Test func aWriteIsReadBackFromAReplicaInTheSameRequest() async throws {
        try await withTopology(url: Self.clusterURL) { topology in
            let primary = try running(DBConnect(
                label: "primary", url: Self.clusterURL, readYourWrites: true, chooseHost: topology.primaryHook()
            ))
            let replica = try running(DBConnect(
                label: "replica", url: Self.clusterURL, options: DBSessionOptions(readOnly: true),
                chooseHost: topology.replicaHook()
            ))
            let table = "ryow_\(UInt32.random(in: 0...UInt32.max))"
            try await primary.withTransaction { try await $0.execute("CREATE TABLE \(unescaped: table) (id int)") }
            for id in 0..<100 {
                let found = try await withDBContext {
                    try await primary.session().execute("INSERT INTO \(unescaped: table) VALUES (\(id))")
                    try await primary.commit()
                    #expect(DBContext.current?.walPosition != nil)
                    return try await replica.session().queryValue(
                        "SELECT count(*)::int FROM \(unescaped: table) WHERE id = \(id)", as: Int.self
                    )
                }
                #expect(found == 1, "row \(id) read back")
            }
            try await primary.withTransaction { try await $0.execute("DROP TABLE \(unescaped: table)") }
            await primary.close()
            await replica.close()
        }
    }
}

/// Routing while servers stop, get promoted or pause replay — each test on a cluster of its own.
@Suite(.serialized, .enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(4)))
struct FailoverTests {
    @Test func aStoppedReplicaCostsNoRequestAndIsUsedAgainWhenBack() async throws {
        let metrics = TestMetrics()
        let logs = InMemoryLogHandler()
        var logger = Logger(label: "topology") { _ in logs }
        logger.logLevel = .debug
        try await ScratchCluster.with(primaryPort: 27432, replicas: 2) { cluster in
            try await withTopology(
                url: cluster.url, instrumentation: DBInstrumentation(metricsFactory: metrics), logger: logger
            ) { topology in
                let replica = try running(DBConnect(
                    label: "replica", url: cluster.url, options: DBSessionOptions(readOnly: true),
                    chooseHost: topology.replicaHook()
                ))
                let stoppedHealth = try metrics.expectGauge(DBMetricName.hostHealth, [
                    ("db.system.name", "postgresql"), ("server.address", "127.0.0.1"), ("server.port", "\(cluster.replicaPorts[0])"),
                ])
                #expect(stoppedHealth.lastValue == 1)
                func read() async throws -> Int {
                    try await withDBContext {
                        try await replica.session().queryValue("SELECT inet_server_port()", as: Int.self) ?? 0
                    }
                }
                for _ in 0..<10 { _ = try await read() }  // both replicas have pooled connections now
                try await cluster.run("stop-replica", "1")
                var failures = 0
                var served = Set<Int>()
                for _ in 0..<200 {
                    do { served.insert(try await read()) } catch { failures += 1 }
                }
                #expect(failures == 0, "reads while a replica is down")
                #expect(!served.isEmpty)
                try await eventually("the stopped replica is marked down") {
                    topology.snapshot.hosts.first { $0.endpoint.port == cluster.replicaPorts[0] }?.isHealthy == false
                }
                #expect(try await read() != cluster.replicaPorts[0])
                #expect(stoppedHealth.lastValue == 0, "contextdb.host.health shows the stopped replica down")
                let failovers = metrics.counters(label: DBMetricName.routingDecisions).filter { counter in
                    counter.dimensions.contains { $0 == ("contextdb.routing.reason", "failover") }
                }
                #expect(failovers.reduce(0) { $0 + $1.totalValue } >= 1, "the session that hit the stopped replica counted a failover")

                try await cluster.run("start-replica", "1")
                try await eventually("the replica is healthy again") {
                    topology.snapshot.replicas.contains { $0.endpoint.port == cluster.replicaPorts[0] }
                }
                // Within the engine's connect retry delay (1 s) of the last refused connect, a lease
                // there still fails fast and the session fails over: the replica serves again once
                // that has passed and a probe has seen it, not necessarily at the next read.
                try await eventually("the replica serves again") { try await read() == cluster.replicaPorts[0] }
                #expect(stoppedHealth.lastValue == 1)

                // The documented log lines, with their keys.
                let stopped = "127.0.0.1:\(cluster.replicaPorts[0])"
                let entries = logs.entries
                let decision = try #require(entries.first { "\($0.message)" == "routing decision" })
                #expect(decision.level == .debug)
                #expect(decision.metadata["db.connect"] == "replica")
                #expect(decision.metadata["contextdb.routing.role"] == "replica")
                #expect(decision.metadata["contextdb.routing.reason"] == "policy")
                #expect(decision.metadata["db.host"] != nil)
                let failover = try #require(entries.first { "\($0.message)" == "failing over to the next host" })
                #expect(failover.level == .info)
                #expect(failover.metadata["db.host"] == .string(stopped))
                #expect(failover.metadata["contextdb.failover.to"] != nil)
                #expect(failover.metadata["error.type"] != nil)
                let down = try #require(entries.first { "\($0.message)" == "host down" })
                #expect(down.level == .warning)
                #expect(down.metadata["db.host"] == .string(stopped))
                #expect(down.metadata["contextdb.host.health"] == "down")
                #expect(entries.contains { "\($0.message)" == "host up" && $0.metadata["db.host"] == .string(stopped) })
                await replica.close()
            }
        }
    }

    /// While no primary is known the topology probes every 100 ms, backing off to 1 s — here
    /// with a normal interval of a minute, which alone would not see the primary in time.
    @Test func withNoPrimaryKnownTheTopologyProbesOftenUntilOneIsFound() async throws {
        try await ScratchCluster.with(primaryPort: 27512, replicas: 0) { cluster in
            try await cluster.run("stop-primary")
            var configuration = PostgresTopology.Configuration()
            configuration.probeInterval = .seconds(60)
            configuration.probeTimeout = .seconds(1)
            let topology = running(try PostgresTopology(url: cluster.url, configuration: configuration))
            try await eventually("the first probe found no primary") {
                topology.isLive && topology.readiness().reason?.contains("no healthy primary") == true
            }
            try await cluster.run("start-primary")
            try await eventually("the primary is found long before a minute") { topology.snapshot.primary != nil }
        }
    }

    /// A write that finds no primary waits for the promotion instead of failing; with no
    /// promotion it fails once `primaryWaitTimeout` has passed.
    @Test func writesWaitForAPrimaryDuringAFailover() async throws {
        try await ScratchCluster.with(primaryPort: 27522, replicas: 1) { cluster in
            var configuration = PostgresTopology.Configuration()
            configuration.probeInterval = .milliseconds(100)
            configuration.probeTimeout = .seconds(1)
            configuration.failuresBeforeDown = 1
            configuration.primaryWaitTimeout = .seconds(20)
            let topology = running(try PostgresTopology(url: cluster.url, configuration: configuration))
            let primary = try running(DBConnect(label: "primary", url: cluster.url, chooseHost: topology.primaryHook()))
            let replica = try running(DBConnect(
                label: "replica", url: cluster.url, options: DBSessionOptions(readOnly: true), chooseHost: topology.replicaHook()
            ))
            try await withDBContext { try await primary.session().execute("CREATE TABLE waited (id int)") }
            try await eventually("the replica has the table") { topology.snapshot.replicas.first?.lagBytes == 0 }

            try await cluster.run("stop-primary")
            try await eventually("no primary is known") { topology.snapshot.primary == nil }
            async let written = withDBContext {
                let session = try await primary.session()  // waits here for a primary
                try await session.execute("INSERT INTO waited VALUES (1)")
                return (session.host, ContinuousClock.now)
            }
            // A read no replica can serve (the replica's WAL receiver lost its primary) must go
            // to the primary: it waits too.
            try await eventually("the replica's WAL receiver lost its primary") {
                topology.snapshot.hosts.first { $0.endpoint.port == cluster.replicaPorts[0] }?
                    .unfitReason(maximumLagBytes: nil, maximumLag: nil) != nil
            }
            async let read = withDBContext {
                let host = try await replica.session().host
                return (host, ContinuousClock.now)
            }
            try await eventually("both wait") { topology.sessionsWaitingForPrimary == 2 }
            // A waiting session whose task is cancelled (its client went away) stops waiting at
            // once, with a CancellationError rather than a timeout, and writes nothing.
            let abandoned = Task {
                try await withDBContext { try await primary.session().execute("INSERT INTO waited VALUES (3)") }
            }
            try await eventually("three wait") { topology.sessionsWaitingForPrimary == 3 }
            abandoned.cancel()
            let abandonedOutcome = await abandoned.result
            #expect(throws: CancellationError.self) { try abandonedOutcome.get() }
            #expect(topology.sessionsWaitingForPrimary == 2, "the cancelled session left the wait")
            let promoting = ContinuousClock.now
            try await cluster.run("promote", "1")
            let (writtenHost, routedWrite) = try await written
            #expect(writtenHost == cluster.endpoint(cluster.replicaPorts[0]), "written on the promoted replica")
            #expect(routedWrite > promoting, "the write waited for the promotion")
            let (readHost, routedRead) = try await read
            #expect(readHost == cluster.endpoint(cluster.replicaPorts[0]), "read on the new primary")
            #expect(routedRead > promoting, "the read waited for the promotion")
            #expect(topology.sessionsWaitingForPrimary == 0)
            let rows = try await withDBContext {
                try await primary.session().query("SELECT id FROM waited").map { try $0.decode(Int.self) }
            }
            #expect(rows == [1], "the cancelled write wrote nothing")

            // No primary and none coming: the wait ends with noHostAvailable (a 503).
            try await cluster.run("stop-replica", "1")
            try await eventually("no primary is known again") { topology.snapshot.primary == nil }
            var short = configuration
            short.primaryWaitTimeout = .milliseconds(300)
            let impatient = running(try PostgresTopology(url: cluster.url, configuration: short))
            await impatient.refresh()
            let late = try running(DBConnect(label: "late", url: cluster.url, chooseHost: impatient.primaryHook()))
            let error = await expectDBError(.noHostAvailable) {
                try await withDBContext { try await late.session().execute("INSERT INTO waited VALUES (2)") }
            }
            #expect(error?.message.contains("primaryWaitTimeout") == true, "\(String(describing: error))")
            for connect in [primary, replica, late] { await connect.close() }
        }
    }

    /// The primary stops and, before any probe notices, a write's lease is refused there: the
    /// session asks the hook again, which waits for the promotion — the write lands on the new
    /// primary instead of failing.
    @Test func aWriteRefusedByTheOldPrimaryWaitsForTheNewOne() async throws {
        try await ScratchCluster.with(primaryPort: 27532, replicas: 1) { cluster in
            var configuration = PostgresTopology.Configuration()
            configuration.probeInterval = .seconds(2)  // probes notice the stop seconds later
            configuration.probeTimeout = .seconds(1)
            configuration.primaryWaitTimeout = .seconds(20)
            let topology = running(try PostgresTopology(url: cluster.url, configuration: configuration))
            await topology.refresh()
            let primary = try running(DBConnect(label: "primary", url: cluster.url, chooseHost: topology.primaryHook()))
            try await withDBContext { try await primary.session().execute("CREATE TABLE rerouted (id int)") }

            try await cluster.run("stop-primary")
            #expect(topology.snapshot.primary?.endpoint.port == cluster.primaryPort, "no probe noticed the stop yet")
            async let written = withDBContext {
                let session = try await primary.session()  // the old primary, still believed healthy
                try await session.execute("INSERT INTO rerouted VALUES (1)")
                return (session.host, ContinuousClock.now)
            }
            try await Task.sleep(for: .milliseconds(300))
            let promoting = ContinuousClock.now
            try await cluster.run("promote", "1")
            let (host, routed) = try await written
            #expect(host == cluster.endpoint(cluster.replicaPorts[0]), "written on the promoted replica")
            #expect(routed > promoting, "the write waited for the promotion")
            await primary.close()
        }
    }

    @Test func writesFollowAPromotionWithoutARestart() async throws {
        try await ScratchCluster.with(primaryPort: 27442, replicas: 1) { cluster in
            try await withTopology(url: cluster.url) { topology in
                let primary = try running(DBConnect(
                    label: "primary", url: cluster.url, chooseHost: topology.primaryHook()
                ))
                try await withDBContext {
                    try await primary.session().execute("CREATE TABLE promoted (at int)")
                }
                #expect(primary.engineHosts == [cluster.endpoint(cluster.primaryPort)])

                try await cluster.run("promote", "1")
                try await cluster.run("stop-primary")
                let started = ContinuousClock.now
                var writtenOn: Int?
                while writtenOn == nil, ContinuousClock.now - started < .seconds(30) {
                    writtenOn = try? await withDBContext {
                        let session = try await primary.session()
                        try await session.execute("INSERT INTO promoted VALUES (1)")
                        return try await session.queryValue("SELECT inet_server_port()", as: Int.self)
                    }
                    if writtenOn == nil { try await Task.sleep(for: .milliseconds(50)) }
                }
                let took = ContinuousClock.now - started
                #expect(writtenOn == cluster.replicaPorts[0], "writes reach the promoted server")
                // Documented bound: a probe interval plus a probe timeout, plus slack for CI.
                #expect(took < .seconds(5), "failover took \(took)")
                try await eventually("the former primary's engine is drained") {
                    !primary.engineHosts.contains(cluster.endpoint(cluster.primaryPort))
                }
                await primary.close()
            }
        }
    }

    @Test func aLaggingReplicaNeverServesStaleDataToATokenAndOnlyWithinMaxLagWithout() async throws {
        let metrics = TestMetrics()
        try await ScratchCluster.with(primaryPort: 27452, replicas: 1) { cluster in
            try await withTopology(url: cluster.url, instrumentation: DBInstrumentation(metricsFactory: metrics)) { topology in
                let primary = try running(DBConnect(
                    label: "primary", url: cluster.url, readYourWrites: true, chooseHost: topology.primaryHook()
                ))
                func replicaConnect(
                    maximumLagBytes: UInt64?, maximumLag: Duration? = PostgresTopology.defaultMaximumLag
                ) throws -> DBConnect<PostgresEngine> {
                    try running(DBConnect(
                        label: "replica", url: cluster.url, options: DBSessionOptions(readOnly: true),
                        chooseHost: topology.replicaHook(
                            maximumLagBytes: maximumLagBytes, maximumLag: maximumLag, readYourWritesWait: .milliseconds(300)
                        )
                    ))
                }
                let limited = try replicaConnect(maximumLagBytes: 1024)
                let unlimited = try replicaConnect(maximumLagBytes: nil)
                try await withDBContext { try await primary.session().execute("CREATE TABLE lagging (id int)") }
                try await eventually("the replica has the table") {
                    topology.snapshot.replicas.first?.lagBytes == 0
                }

                try await cluster.run("pause-replay", "1")
                let token = try await withDBContext {
                    try await primary.session().execute("INSERT INTO lagging SELECT generate_series(1, 1000)")
                    try await primary.commit()
                    return DBContext.current!.consistencyToken!
                }
                try await eventually("the topology sees the lag") {
                    (topology.snapshot.replicas.first?.lagBytes ?? 0) > 1024
                }

                // A read carrying the token: the replica cannot catch up, so after the wait the
                // primary serves it — never stale.
                let withToken = try await withDBRequest(consistencyToken: token, statusCode: { _ in 200 }) {
                    let session = try await unlimited.session()
                    return (session.host, try await session.queryValue("SELECT count(*)::int FROM lagging", as: Int.self))
                }
                #expect(withToken.0 == cluster.endpoint(cluster.primaryPort))
                #expect(withToken.1 == 1000)
                #expect(metrics.counterTotal(label: DBMetricName.routingDecisions, dimensions: [
                    ("db.system.name", "postgresql"), ("db.client.connection.pool.name", "replica"),
                    ("contextdb.routing.role", "primary"), ("contextdb.routing.reason", "token_primary"),
                ]) == 1)
                #expect(try metrics.expectTimer(DBMetricName.consistencyWaitTime, [
                    ("db.system.name", "postgresql"), ("db.client.connection.pool.name", "replica"),
                ]).values.count == 1, "the read waited for the replica first")
                let lag = try metrics.expectGauge(DBMetricName.replicaLag, [
                    ("db.system.name", "postgresql"), ("server.address", "127.0.0.1"),
                    ("server.port", "\(cluster.replicaPorts[0])"), ("unit", "bytes"),
                ])
                #expect((lag.lastValue ?? 0) > 1024, "contextdb.replica.lag shows the lag")

                // Without a token: the lagging replica only within the max lag.
                let limitedHost = try await withDBContext { try await limited.session().host }
                #expect(limitedHost == cluster.endpoint(cluster.primaryPort), "over the limit: primary")
                let stale = try await withDBContext {
                    let session = try await unlimited.session()
                    return (session.host, try await session.queryValue("SELECT count(*)::int FROM lagging", as: Int.self))
                }
                #expect(stale.0 == cluster.endpoint(cluster.replicaPorts[0]), "no limit: the replica")
                #expect(stale.1 == 0, "which is behind, as allowed without a token")

                // Per-request scopes: a time limit the replica is over, lifted by withMaxStaleness;
                // withPrimaryReads sends even a limitless connect's reads to the primary.
                let strict = try replicaConnect(maximumLagBytes: nil, maximumLag: .milliseconds(300))
                try await eventually("the replica lags more than 0.3 s") {
                    topology.snapshot.replicas.first?.unfitReason(maximumLagBytes: nil, maximumLag: .milliseconds(300)) != nil
                }
                let strictHost = try await withDBContext { try await strict.session().host }
                #expect(strictHost == cluster.endpoint(cluster.primaryPort), "over the time limit: primary")
                let relaxedHost = try await withMaxStaleness(.seconds(600)) {
                    try await withDBContext { try await strict.session().host }
                }
                #expect(relaxedHost == cluster.endpoint(cluster.replicaPorts[0]), "within the scope's limit: the replica")
                let forcedHost = try await withPrimaryReads {
                    try await withDBContext { try await unlimited.session().host }
                }
                #expect(forcedHost == cluster.endpoint(cluster.primaryPort), "withPrimaryReads: the primary")
                #expect(metrics.counterTotal(label: DBMetricName.routingDecisions, dimensions: [
                    ("db.system.name", "postgresql"), ("db.client.connection.pool.name", "replica"),
                    ("contextdb.routing.role", "primary"), ("contextdb.routing.reason", "scope"),
                ]) == 1)
                await strict.close()

                // Once replay resumes, the token's reads go back to the replica.
                try await cluster.run("resume-replay", "1")
                let resumed = try await withDBRequest(consistencyToken: token, statusCode: { _ in 200 }) {
                    let session = try await unlimited.session()
                    return (session.host, try await session.queryValue("SELECT count(*)::int FROM lagging", as: Int.self))
                }
                #expect(resumed.0 == cluster.endpoint(cluster.replicaPorts[0]))
                #expect(resumed.1 == 1000)
                for connect in [primary, limited, unlimited] { await connect.close() }
            }
        }
    }
}
