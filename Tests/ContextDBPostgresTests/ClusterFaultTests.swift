import ContextDB
import ContextDBPostgres
import Foundation
import Logging
import PostgresNIO
import Testing
import TestSupport

/// Faults of the issue "A request never hangs…" that need servers frozen, stopped or promoted,
/// each on a scratch cluster of its own (fixed ports outside the range Linux hands to outgoing
/// connections, unique per test).
@Suite(.serialized, .enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(4)))
struct ClusterFaultTests {
    /// The example's probe settings: every 500 ms, 2 s timeout.
    private func withDefaultTopology<R>(url: String, _ body: (PostgresTopology) async throws -> R) async throws -> R {
        let topology = running(try PostgresTopology(url: url))
        await topology.refresh()
        return try await body(topology)
    }

    @Test func aFrozenReplicaIsMarkedDownOnItsOwnAndItsStatementsFailOnTime() async throws {
        try await ScratchCluster.with(primaryPort: 27462, replicas: 2) { cluster in
            try await withDefaultTopology(url: cluster.url) { topology in
                let frozenPort = cluster.replicaPorts[0]
                let frozenHost = cluster.endpoint(frozenPort)
                // Bound to the replica that will freeze, with the example's statement timeout.
                let pinned = try running(DBConnect(
                    label: "pinned", url: cluster.url, options: DBSessionOptions(readOnly: true),
                    statementTimeout: .milliseconds(500),
                    beforeCreateSession: { try $0.changeHost(frozenHost) }
                ))
                let replica = try running(DBConnect(
                    label: "replica", url: cluster.url, options: DBSessionOptions(readOnly: true),
                    statementTimeout: .milliseconds(500), chooseHost: topology.replicaHook()
                ))
                func read(_ connect: DBConnect<PostgresEngine>) async throws -> Int {
                    try await withDBContext {
                        try await connect.session().queryValue("SELECT inet_server_port()", as: Int.self) ?? 0
                    }
                }
                let pid = try await withDBContext {
                    let session = try await pinned.session()
                    #expect(try await session.queryValue("SELECT inet_server_port()", as: Int.self) == frozenPort)
                    return try #require(try await session.queryValue("SELECT pg_backend_pid()", as: Int.self))
                }
                // A pooled connection to it now — once its reset, which runs after the release,
                // is done: a freeze during the reset would close it, and the next read would
                // time out connecting instead of on its statement.
                let observer = try running(DBConnect(
                    label: "observer", url: cluster.url, options: DBSessionOptions(readOnly: true),
                    beforeCreateSession: { try $0.changeHost(frozenHost) }
                ))
                try await eventually("the pinned connection is reset and idle") {
                    try await withDBContext {
                        try await observer.session().queryValue(
                            "SELECT state = 'idle' AND query LIKE 'DO %' FROM pg_stat_activity WHERE pid = \(pid)", as: Bool.self
                        ) == true
                    }
                }
                await observer.close()

                try await cluster.run("freeze-replica", "1")
                // BEGIN on the pooled connection: a cancel request at 500 ms (which the frozen
                // host ignores), the connection closed a second later: an error naming the host.
                let frozenAt = ContinuousClock.now
                async let pinnedRead: Result<Int, any Error> = {
                    do { return .success(try await read(pinned)) } catch { return .failure(error) }
                }()
                // Meanwhile: down within probe timeout + one interval (2.5 s), on its own probes.
                try await eventually("the frozen replica is marked down", timeout: .seconds(3)) {
                    topology.snapshot.hosts.first { $0.endpoint.port == frozenPort }?.isHealthy == false
                }
                let outcome = await pinnedRead
                // A liveness bound, not a speed figure: deadline (0.5 s) + cancel connect (≤ 1 s)
                // + grace (1 s), with room for a loaded machine — the fault was a 16 s hang.
                #expect(frozenAt.duration(to: .now) < .seconds(8), "the read on the frozen host returned")
                switch outcome {
                case .success:
                    Issue.record("a read on a frozen host succeeded")
                case .failure(let error as DBError):
                    #expect(error.code == .statementTimeout, "\(error)")
                    #expect(error.description.contains(frozenHost), "\(error)")
                case .failure(let error):
                    Issue.record("not a DBError: \(error)")
                }
                // The other replica's probes went on meanwhile.
                let other = topology.snapshot.hosts.first { $0.endpoint.port == cluster.replicaPorts[1] }
                #expect(other?.isHealthy == true)
                #expect(other?.consecutiveFailures == 0)
                // No read that starts now goes to the frozen host.
                for _ in 0..<20 { #expect(try await read(replica) != frozenPort) }

                try await cluster.run("thaw-replica", "1")
                try await eventually("the thawed replica is healthy again") {
                    topology.snapshot.replicas.contains { $0.endpoint.port == frozenPort }
                }
                #expect(try await read(pinned) == frozenPort, "a new connection serves after the thaw")
                await pinned.close()
                await replica.close()
            }
        }
    }

    @Test func aReplicaThatLostItsPrimaryServesNoTokenlessRead() async throws {
        try await ScratchCluster.with(primaryPort: 27472, replicas: 2) { cluster in
            try await withDefaultTopology(url: cluster.url) { topology in
                let primary = try running(DBConnect(label: "primary", url: cluster.url, chooseHost: topology.primaryHook()))
                let replica = try running(DBConnect(
                    label: "replica", url: cluster.url, options: DBSessionOptions(readOnly: true),
                    chooseHost: topology.replicaHook()
                ))
                try await withDBContext { try await primary.session().execute("CREATE TABLE items (text text)") }
                try await eventually("both replicas stream and caught up") {
                    let replicas = topology.snapshot.replicas
                    return replicas.count == 2 && replicas.allSatisfy { $0.walReceiverStatus == "streaming" && $0.lagBytes == 0 }
                }

                // A probing role without pg_read_all_stats sees the receiver but not its status:
                // its replicas stay fit.
                try await withDBContext {
                    try await primary.session().execute("CREATE ROLE contextdb_probe LOGIN PASSWORD 'contextdb_probe'")
                }
                let unprivilegedURL = cluster.url.replacingOccurrences(
                    of: "\(TestCluster.user):\(TestCluster.password)@", with: "contextdb_probe:contextdb_probe@"
                )
                try await withDefaultTopology(url: unprivilegedURL) { unprivileged in
                    try await eventually("the unprivileged topology sees both replicas") { unprivileged.snapshot.replicas.count == 2 }
                    for replica in unprivileged.snapshot.replicas {
                        #expect(replica.walReceiverStatus == nil)
                        #expect(replica.unfitReason(maximumLagBytes: nil, maximumLag: nil) == nil)
                    }
                }

                try await cluster.run("stop-primary")
                try await cluster.run("promote", "1")
                let newPrimary = cluster.endpoint(cluster.replicaPorts[0])
                let orphan = cluster.replicaPorts[1]
                try await eventually("the topology follows the promotion") {
                    topology.snapshot.primary?.endpoint.description == newPrimary
                }
                try await eventually("the orphaned replica is unfit") {
                    topology.snapshot.hosts.first { $0.endpoint.port == orphan }?
                        .unfitReason(maximumLagBytes: PostgresTopology.defaultMaximumLagBytes, maximumLag: PostgresTopology.defaultMaximumLag) != nil
                }
                let reason = topology.snapshot.hosts.first { $0.endpoint.port == orphan }?
                    .unfitReason(maximumLagBytes: nil, maximumLag: nil)
                #expect(reason?.contains("WAL receiver") == true, "\(reason ?? "fit")")

                try await withDBContext { try await primary.session().execute("INSERT INTO items VALUES ('new')") }
                for _ in 0..<6 {
                    let (host, count) = try await withDBContext {
                        let session = try await replica.session()
                        return (session.host, try await session.queryValue("SELECT count(*)::int FROM items", as: Int.self))
                    }
                    #expect(count == 1, "a token-less read sees the new primary's write (served by \(host))")
                    #expect(host != cluster.endpoint(orphan))
                }
                await primary.close()
                await replica.close()
            }
        }
    }

    @Test func aReplicaSessionEndedForARecoveryConflictFailsWithTheServersReason() async throws {
        try await ScratchCluster.with(primaryPort: 27482, replicas: 1) { cluster in
            let primary = try running(DBConnect(label: "primary", url: TestCluster.url(port: cluster.primaryPort)))
            let replica = try running(DBConnect(
                label: "replica", url: TestCluster.url(port: cluster.replicaPorts[0]), options: DBSessionOptions(readOnly: true)
            ))
            // The replica cancels queries that block replay for more than a second.
            // ALTER SYSTEM runs outside a transaction: on a plain connection, not a session.
            let admin = try await PostgresConnection.connect(
                configuration: PostgresConnection.Configuration(
                    host: "127.0.0.1", port: cluster.replicaPorts[0], username: TestCluster.user,
                    password: TestCluster.password, database: TestCluster.database, tls: .disable
                ),
                id: 1, logger: Logger(label: "test")
            )
            try await admin.query("ALTER SYSTEM SET max_standby_streaming_delay = '1s'", logger: Logger(label: "test"))
            try await admin.query("SELECT pg_reload_conf()", logger: Logger(label: "test"))
            try await admin.close()
            try await primary.withTransaction { session in
                try await session.execute("CREATE TABLE conflicted (id int)")
                try await session.execute("INSERT INTO conflicted VALUES (1)")
            }
            let position = try await primary.withSession { try await $0.queryValue("SELECT pg_current_wal_lsn()::text", as: String.self)! }
            try await eventually("the replica replayed the table") {
                try await replica.withSession {
                    try await $0.queryValue("SELECT pg_last_wal_replay_lsn() >= \(position)::pg_lsn", as: Bool.self) ?? false
                }
            }
            try await eventually("the new delay is in force") {
                try await replica.withSession { try await $0.queryValue("SHOW max_standby_streaming_delay", as: String.self) == "1s" }
            }

            let error = await expectDBError(.commitFailed) {
                try await withDBContext {
                    let session = try await replica.session()
                    #expect(try await session.queryValue("SELECT count(*)::int FROM conflicted", as: Int.self) == 1)
                    let pid = try await session.queryValue("SELECT pg_backend_pid()", as: Int32.self)!
                    // The primary takes ACCESS EXCLUSIVE on the table this idle transaction read.
                    try await primary.withTransaction { try await $0.execute("LOCK TABLE conflicted IN ACCESS EXCLUSIVE MODE") }
                    // A second later the replica ends this session (40001); seen from another one.
                    try await eventually("the replica ended the conflicting session", timeout: .seconds(30)) {
                        try await replica.withSession { other in
                            try await other.queryValue(
                                "SELECT count(*)::int FROM pg_stat_activity WHERE pid = \(pid)", as: Int.self
                            ) == 0
                        }
                    }
                    let lost = await expectDBError(.connectionLost) { try await session.execute("SELECT 1") }
                    #expect(lost?.host == cluster.endpoint(cluster.replicaPorts[0]))
                }
            }
            #expect(error?.message.contains("lost") == true)
            // The next read on the same connect works.
            let count = try await withDBContext {
                try await replica.session().queryValue("SELECT count(*)::int FROM conflicted", as: Int.self)
            }
            #expect(count == 1)
            await primary.close()
            await replica.close()
        }
    }
}
