import ContextDB
import Foundation
import ContextDBPostgres
import PostgresNIO
import Testing
import TestSupport

/// libpq's connection-string parameters that route or configure a connect by themselves,
/// against the test cluster (a primary and its replicas).
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct ConnectionStringTests {
    /// The cluster's URI with `query`, the hosts in `order` (default: primary first).
    static func url(_ query: String, hosts: [String]? = nil) -> String {
        let hosts = hosts ?? ([TestCluster.primaryEndpoint] + TestCluster.replicaEndpoints)
        return "postgresql://\(TestCluster.user):\(TestCluster.password)@\(hosts.joined(separator: ","))/\(TestCluster.database)?sslmode=disable&\(query)"
    }

    static func servingPort(_ connect: DBConnect<PostgresEngine>) async throws -> Int? {
        try await withDBContext { try await connect.session().queryValue("SELECT inet_server_port()", as: Int.self) }
    }

    @Test func standbyAloneIsAReplicaConnect() async throws {
        let replica = try running(DBConnect(label: "replica", url: Self.url("target_session_attrs=standby")))
        let replicaPorts = Set(TestCluster.replicaPorts)
        for _ in 0..<6 {
            let port = try #require(try await Self.servingPort(replica))
            #expect(replicaPorts.contains(port), "a standby serves: \(port)")
        }
        await expectDBError(.readOnlySession) {
            try await withDBContext { try await replica.session().execute("CREATE TABLE never_made (id int)") }
        }
        await replica.close()
    }

    @Test func readWriteFindsThePrimaryWhereverItIsListed() async throws {
        let hosts = TestCluster.replicaEndpoints + [TestCluster.primaryEndpoint]  // the primary last
        let primary = try running(DBConnect(label: "primary", url: Self.url("target_session_attrs=read-write", hosts: hosts)))
        #expect(try await Self.servingPort(primary) == TestCluster.port)
        await primary.close()
    }

    @Test func preferStandbyAndLoadBalancingSpreadOverTheStandbys() async throws {
        let replica = try running(DBConnect(
            label: "replica", url: Self.url("target_session_attrs=prefer-standby&load_balance_hosts=random")
        ))
        var served = Set<Int>()
        for _ in 0..<40 { served.insert(try #require(try await Self.servingPort(replica))) }
        #expect(served.isSubset(of: Set(TestCluster.replicaPorts)), "\(served)")
        #expect(served.count == TestCluster.replicaPorts.count, "random spreads over every standby: \(served)")
        await replica.close()
    }

    @Test func anyTriesTheHostsInOrder() async throws {
        let hosts = ["127.0.0.1:1", TestCluster.primaryEndpoint]  // the first refuses connections
        let connect = try running(DBConnect(label: "any", url: Self.url("connect_timeout=2", hosts: hosts)))
        #expect(try await Self.servingPort(connect) == TestCluster.port)
        await connect.close()
    }

    @Test func optionsAreSetOnEachConnection() async throws {
        let connect = try running(DBConnect(
            label: "options", url: Self.url("options=-c%20statement_timeout%3D4321%20-c%20application_name%3Dfrom_options")
        ))
        let (timeout, name) = try await withDBContext {
            let session = try await connect.session()
            return (
                try await session.queryValue("SHOW statement_timeout", as: String.self),
                try await session.queryValue("SELECT current_setting('application_name')", as: String.self)
            )
        }
        #expect(timeout == "4321ms")
        #expect(name == "from_options")
        await connect.close()
    }

    /// A connect that may write, on a host that may not (as a demoted primary after a failover):
    /// not the request's fault — `noHostAvailable`, a 503 — where a read-only connect's write is
    /// `readOnlySession`, a 409.
    @Test func aWriteOnAHostThatBecameReadOnlyIsRetryable() async throws {
        let connect = try running(DBConnect(label: "primary", url: Self.url("options=-c%20default_transaction_read_only%3Don")))
        let error = await expectDBError(.noHostAvailable) {
            try await withDBContext { try await connect.session().execute("CREATE TABLE never_made (id int)") }
        }
        #expect(error?.message.contains("the host is read-only now") == true)
        #expect(error?.httpAnswer().status == 503)
        await connect.close()
    }

    @Test func aHookOfYourOwnAndTargetSessionAttrsAreRefusedTogether() async throws {
        let error = await expectDBError(.invalidConfiguration) {
            _ = try DBConnect(label: "both", url: Self.url("target_session_attrs=standby"), chooseHost: { _ in DBHostChoice("x") })
        }
        #expect(error?.message.contains("routes by itself") == true)
    }

    /// libpq's `keepalives*` are set on each pooled connection's socket: the kernel's
    /// keepalive timer runs with the idle time asked for (read from `/proc/net/tcp`, whose timer
    /// column counts clock ticks of 1/100 s), and none without them.
    @Test func keepalivesAreSetOnEachConnectionsSocket() async throws {
        #if os(Linux)
        /// The keepalive timer of the socket a connect of `query` leases: `tr` and `tm->when`.
        func keepaliveTimer(_ query: String) async throws -> (timer: Int, ticks: Int)? {
            let connect = try running(DBConnect(label: "keepalive", url: TestCluster.url(query: "sslmode=disable&\(query)")))
            func timer(port: Int) throws -> (timer: Int, ticks: Int)? {
                let local = String(format: "%04X", port)
                let remote = String(format: "%04X", TestCluster.port)
                // sl local_address rem_address st tx_queue:rx_queue tr:tm->when ...
                for line in try procFile("/proc/net/tcp").split(separator: "\n").dropFirst() {
                    let fields = line.split(separator: " ")
                    guard fields.count > 5, fields[1].hasSuffix(":" + local), fields[2].hasSuffix(":" + remote) else { continue }
                    let timer = fields[5].split(separator: ":")
                    return (Int(timer[0], radix: 16) ?? -1, Int(timer[1], radix: 16) ?? -1)
                }
                return nil
            }
            // Read while the session holds the connection, once what it sent was acknowledged
            // (until then the retransmission timer, 1, runs).
            let found = try await withDBContext {
                let port = try #require(try await connect.session().queryValue("SELECT inet_client_port()", as: Int.self))
                try await eventually("the connection is idle") { try timer(port: port)?.timer != 1 }
                return try timer(port: port)
            }
            await connect.close()
            return found
        }
        let on = try #require(try await keepaliveTimer("keepalives=1&keepalives_idle=600&keepalives_interval=7&keepalives_count=3"))
        #expect(on.timer == 2, "the keepalive timer runs")
        #expect((50_000...60_000).contains(on.ticks), "it fires after the 600 s asked for: \(on.ticks) ticks")
        let off = try #require(try await keepaliveTimer("keepalives=0"))
        #expect(off.timer == 0, "no keepalive timer with keepalives=0")
        let plain = try #require(try await keepaliveTimer("application_name=plain"))
        #expect(plain.timer == 0, "no keepalive timer without the parameters")
        #endif
        let parsed = try PostgresURL(Self.url("keepalives_idle=30&keepalives_count=0"))
        #expect(parsed.keepalive == PostgresKeepalive(isEnabled: true, idle: .seconds(30), interval: nil, count: nil))
    }

    @Test(arguments: ["target_session_attrs=replica", "load_balance_hosts=round-robin", "keepalives=yes", "keepalives_idle=-1",
                      "keepalives_interval=1.5", "keepalives_count=many", "keepalives_idle=40000", "keepalives_count=128"])
    func unknownValuesAreRefused(query: String) async throws {
        let error = await expectDBError(.invalidConfiguration) { _ = try PostgresURL(Self.url(query)) }
        #expect(error?.message.contains(String(query.split(separator: "=")[0])) == true)
    }
}

/// Safe retries: a read-only transaction's first statement that lost its connection runs once
/// more on the next host; a later statement does not.
@Suite(.enabled(if: TestCluster.isAvailable && !TestCluster.replicaPorts.isEmpty), .runsServices, .timeLimit(.minutes(1)))
struct SafeReadRetryTests {
    /// The statement `read` sleeps in: long on a standby (until the test ends its backend),
    /// no time on the primary, where the retry runs.
    static let sleepOnStandby = "SELECT inet_server_port() FROM (SELECT CASE WHEN pg_is_in_recovery() THEN pg_sleep(30) END) AS wait"

    /// Runs `read` on a replica-first connect, ends its backend while `sleepOnStandby` runs
    /// there, and returns what `read` returned.
    func readWhileTheReplicaEndsIt<R: Sendable>(
        _ read: @escaping @Sendable (DBSession<PostgresEngine>) async throws -> R
    ) async throws -> R {
        let name = "retry_\(UInt32.random(in: 0...UInt32.max))"
        let replica = TestCluster.replicaEndpoints[0]
        let connect = try running(DBConnect(
            label: "replica", url: TestCluster.clusterURL(query: "sslmode=disable&application_name=\(name)"),
            options: DBSessionOptions(readOnly: true),
            chooseHost: { _ in DBHostChoice(replica, fallbacks: [TestCluster.primaryEndpoint]) }
        ))
        let admin = try running(DBConnect(label: "admin", url: TestCluster.url(port: TestCluster.replicaPorts[0])))
        defer { Task { await connect.close(); await admin.close() } }
        async let result = withDBContext { try await read(connect.session()) }
        try await eventually("the read sleeps on the replica") {
            try await admin.withSession { session in
                try await session.queryValue(
                    "SELECT count(*)::int FROM pg_stat_activity WHERE application_name = \(name) AND state = 'active' AND query LIKE '%pg_sleep%'",
                    as: Int.self
                )
            } == 1
        }
        try await admin.withSession { session in
            try await session.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = \(name)")
        }
        return try await result
    }

    @Test func aFirstReadThatLostItsConnectionRunsOnTheNextHost() async throws {
        let port = try await readWhileTheReplicaEndsIt { session in
            try await session.queryValue(PostgresQuery(unsafeSQL: Self.sleepOnStandby), as: Int.self)
        }
        #expect(port == TestCluster.port, "the primary, the replica's fallback, answered")
    }

    @Test func aLaterReadIsNeverRetried() async throws {
        let error = await expectDBError(.connectionLost) {
            _ = try await readWhileTheReplicaEndsIt { session in
                _ = try await session.queryValue("SELECT 1", as: Int.self)  // the transaction's first statement
                return try await session.queryValue(PostgresQuery(unsafeSQL: Self.sleepOnStandby), as: Int.self)
            }
        }
        #expect(error?.host == TestCluster.replicaEndpoints[0])
    }
}

#if os(Linux)
/// A `/proc` file read to its end: its size reads as 0, and one read returns a page at most.
private func procFile(_ path: String) throws -> String {
    let handle = try #require(FileHandle(forReadingAtPath: path))
    defer { try? handle.close() }
    var data = Data()
    while let chunk = try handle.read(upToCount: 65_536), !chunk.isEmpty { data.append(chunk) }
    return String(decoding: data, as: UTF8.self)
}
#endif
