import ContextDB
import ContextDBPostgres
import InMemoryLogging
import Logging
import MetricsTestKit
import Synchronization
import Testing
import TestSupport

/// Hosts that come and go (`DBHostSource`), against the shared test cluster: DNS through an
/// injectable resolver, one real lookup of `localhost`, and a source of the test's own.
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct HostSourceTests {
    private static var fastProbes: PostgresTopology.Configuration {
        var configuration = PostgresTopology.Configuration()
        configuration.probeInterval = .milliseconds(100)
        configuration.probeTimeout = .seconds(5)
        return configuration
    }

    @Test func theSystemResolverFindsLocalhostAndNamesAHostItCannotFind() async throws {
        #expect(try await DBHostSource.systemResolver("localhost").contains("127.0.0.1"))
        let error = await expectDBError(.connectionFailed) { _ = try await DBHostSource.systemResolver("no-such-host.invalid") }
        #expect(error?.message.contains("no-such-host.invalid") == true)
    }

    /// One real lookup: `localhost` on the primary's port is the primary (on a cluster that
    /// listens on 127.0.0.1, as `scripts/pg-cluster.sh`'s does).
    @Test(.enabled(if: TestCluster.host == "127.0.0.1"))
    func aDNSSourceResolvesLocalhostToThePrimary() async throws {
        let url = TestCluster.url(host: "localhost")
        let topology = running(try PostgresTopology(url: url, configuration: Self.fastProbes, hosts: .dns(every: .seconds(1))))
        try await eventually("the primary is found") { topology.snapshot.primary?.endpoint == PostgresEndpoint(host: "127.0.0.1", port: TestCluster.port) }
        #expect(topology.snapshot.hosts.allSatisfy { $0.endpoint.host != "localhost" }, "hosts are addresses")
    }

    /// A name whose addresses change: one host per address, each probed; a lookup that fails
    /// keeps the hosts; an address missing from two lookups in a row leaves the snapshot.
    /// (127.0.0.2 is loopback too, where nothing listens: the cluster listens on 127.0.0.1.)
    @Test(.enabled(if: TestCluster.host == "127.0.0.1"))
    func aDNSNameBecomesOneHostPerAddressAndFollowsItsChanges() async throws {
        let addresses = Mutex<Result<[String], DBError>>(.success(["127.0.0.1"]))
        let lookups = Atomic<Int>(0)
        let resolver: DBHostSource.Resolver = { name in
            #expect(name == "db.test")
            lookups.add(1, ordering: .relaxed)
            return try addresses.withLock { $0 }.get()
        }
        let logs = InMemoryLogHandler()
        let url = TestCluster.url(host: "db.test")
        let topology = running(try PostgresTopology(
            url: url, configuration: Self.fastProbes, hosts: .dns(every: .milliseconds(100), resolver: resolver),
            logger: Logger(label: "topology") { _ in logs }
        ))
        let primaryEndpoint = PostgresEndpoint(host: "127.0.0.1", port: TestCluster.port)
        try await eventually("the address is the primary") { topology.snapshot.primary?.endpoint == primaryEndpoint }
        #expect(topology.readiness().isReady)
        let primary = try running(DBConnect(label: "primary", url: url, chooseHost: topology.primaryHook()))
        let host = try await withDBContext { try await primary.session().host }
        #expect(host == primaryEndpoint.description, "sessions go to the address, not the name")

        // A second address: probed (nothing listens there, so it is down), the first kept.
        addresses.withLock { $0 = .success(["127.0.0.1", "127.0.0.2"]) }
        try await eventually("the new address is probed") {
            topology.snapshot.hosts.first { $0.endpoint.host == "127.0.0.2" }?.lastError != nil
        }
        #expect(topology.snapshot.primary?.endpoint == primaryEndpoint)

        // A lookup that fails changes nothing.
        addresses.withLock { $0 = .failure(DBError(.connectionFailed, "could not resolve db.test: the resolver is down")) }
        let before = lookups.load(ordering: .relaxed)
        try await eventually("failed lookups happened") { lookups.load(ordering: .relaxed) >= before + 3 }
        #expect(topology.snapshot.hosts.map(\.endpoint.host) == ["127.0.0.1", "127.0.0.2"])
        #expect(logs.entries.contains { "\($0.message)" == "could not look up the cluster's hosts; keeping the previous ones" })

        // The primary's address vanishes: no primary any more.
        addresses.withLock { $0 = .success(["127.0.0.2"]) }
        try await eventually("the vanished address is gone") { topology.snapshot.hosts.map(\.endpoint.host) == ["127.0.0.2"] }
        #expect(topology.snapshot.primary == nil)
        let changed = logs.entries.filter { "\($0.message)" == "the cluster's hosts changed" }
        #expect(changed.contains { $0.metadata["contextdb.hosts.removed"] == .string(primaryEndpoint.description) })
        await primary.close()
    }

    /// A source of the test's own drops a replica: sessions stop going there, the replica
    /// connect drains its engine for it and its gauges go; when it comes back it serves again.
    @Test func aReplicaThatLeavesIsDrainedAndOneThatComesBackServes() async throws {
        try #require(TestCluster.replicaPorts.count >= 2, "the test cluster has two replicas")
        let everyHost = ([TestCluster.port] + TestCluster.replicaPorts).map { PostgresEndpoint(host: TestCluster.host, port: $0) }
        let leaving = everyHost[2]
        let hosts = Mutex(everyHost)
        let metrics = TestMetrics()
        let topology = running(try PostgresTopology(
            url: TestCluster.clusterURL(), configuration: Self.fastProbes,
            hosts: .custom(every: .milliseconds(100)) { hosts.withLock { $0 } },
            instrumentation: DBInstrumentation(metricsFactory: metrics)
        ))
        let replica = try running(DBConnect(
            label: "replica", url: TestCluster.clusterURL(), options: DBSessionOptions(readOnly: true),
            chooseHost: topology.replicaHook(fallbackToPrimary: false)
        ))
        func read() async throws -> String {
            try await withDBContext {
                let session = try await replica.session()
                _ = try await session.queryValue("SELECT 1", as: Int.self)  // sessions are lazy: this connects
                return session.host
            }
        }
        try await eventually("both replicas serve") { topology.snapshot.replicas.count == 2 }
        try await eventually("round robin reaches the replica that will leave") { try await read() == leaving.description }
        #expect(replica.engineHosts.contains(leaving.description))
        let gauge = { try metrics.expectGauge(DBMetricName.hostHealth, [
            ("db.system.name", "postgresql"), ("server.address", leaving.host), ("server.port", "\(leaving.port)"),
        ]) }
        #expect(try gauge().lastValue == 1)

        hosts.withLock { $0.removeAll { $0 == leaving } }
        try await eventually("the replica left the snapshot") { !topology.snapshot.hosts.contains { $0.endpoint == leaving } }
        var after = Set<String>()
        for _ in 0..<6 { after.insert(try await read()) }
        #expect(!after.contains(leaving.description), "no session goes to a host that left")
        try await eventually("the connect drained its engine for the host that left") {
            !replica.engineHosts.contains(leaving.description)
        }
        #expect((try? gauge()) == nil, "the gauges of a host that left are destroyed")

        hosts.withLock { $0 = everyHost }
        try await eventually("the replica is back and probed") { topology.snapshot.replicas.contains { $0.endpoint == leaving } }
        try await eventually("it serves again") { try await read() == leaving.description }
        await replica.close()
    }

    /// A source whose first lookup fails: not ready, and sessions fail with a typed error
    /// instead of waiting for good.
    @Test func aSourceThatNeverAnsweredIsNotReady() async throws {
        var configuration = Self.fastProbes
        configuration.probeTimeout = .milliseconds(300)
        let topology = running(try PostgresTopology(
            url: TestCluster.clusterURL(), configuration: configuration,
            hosts: .custom(every: .milliseconds(100)) { throw DBError(.connectionFailed, "the registry is down") }
        ))
        try await eventually("the topology runs") { topology.isLive }
        #expect(topology.readiness().reason == "the cluster's hosts have not been looked up yet")
        let primary = try running(DBConnect(label: "primary", url: TestCluster.clusterURL(), chooseHost: topology.primaryHook()))
        await expectDBError(.noHostAvailable) { try await withDBContext { _ = try await primary.session() } }
        await primary.close()
    }
}
