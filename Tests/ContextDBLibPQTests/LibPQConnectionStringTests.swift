import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import Foundation
import Testing
import TestSupport

/// What only libpq gives: the `PG*` environment, a password file, a service file, a Unix
/// socket, `target_session_attrs` at connect — and routing by `PostgresTopology`'s hooks.
/// Serialized: the environment tests set process-wide variables.
@Suite(.serialized, .enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct LibPQConnectionStringTests {
    static func serverPort(_ conninfo: String) async throws -> (port: Int?, user: String?, replica: Bool?) {
        let connect = try running(DBConnect(label: "libpq", conninfo: conninfo))
        let result = try await connect.withSession { session in
            let row = try #require(try await session.query("SELECT inet_server_port(), current_user::text, pg_is_in_recovery()").first)
            return try row.decode((Int?, String?, Bool?).self)
        }
        await connect.close()
        return (result.0, result.1, result.2)
    }

    /// Sets environment variables for `body`, then restores them.
    static func withEnvironment<R>(_ variables: [String: String], _ body: () async throws -> R) async rethrows -> R {
        let saved = variables.keys.map { ($0, ProcessInfo.processInfo.environment[$0]) }
        for (name, value) in variables { setenv(name, value, 1) }
        defer {
            for (name, value) in saved {
                if let value { setenv(name, value, 1) } else { unsetenv(name) }
            }
        }
        return try await body()
    }

    static func temporaryFile(_ contents: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("contextdb-libpq-\(UInt64.random(in: 0...UInt64.max))").path
        try contents.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o600)  // libpq ignores a password file others may read
        return path
    }

    @Test func theEnvironmentAloneConfiguresAConnect() async throws {
        let served = try await Self.withEnvironment([
            "PGHOST": TestCluster.host, "PGPORT": "\(TestCluster.port)", "PGUSER": TestCluster.user,
            "PGDATABASE": TestCluster.database, "PGPASSWORD": TestCluster.password, "PGSSLMODE": "disable",
        ]) {
            try await Self.serverPort("")
        }
        #expect(served.port == TestCluster.port && served.user == TestCluster.user)
    }

    @Test func aPasswordFileSuppliesThePassword() async throws {
        let passfile = try Self.temporaryFile("\(TestCluster.host):\(TestCluster.port):*:\(TestCluster.user):\(TestCluster.password)\n")
        defer { try? FileManager.default.removeItem(atPath: passfile) }
        let base = "host=\(TestCluster.host) port=\(TestCluster.port) user=\(TestCluster.user) dbname=\(TestCluster.database) sslmode=disable"
        #expect(try await Self.serverPort("\(base) passfile=\(passfile)").port == TestCluster.port)
        // Without it the server's password request fails the connect — with libpq's reason,
        // and nothing of the string's secrets.
        let wrong = try Self.temporaryFile("*:*:*:*:not-the-password\n")
        defer { try? FileManager.default.removeItem(atPath: wrong) }
        let error = await expectDBError(.connectionFailed) { _ = try await Self.serverPort("\(base) passfile=\(wrong)") }
        #expect(error?.message.contains("password authentication failed") == true, "\(String(describing: error))")
        #expect(error?.message.contains("not-the-password") == false)
    }

    @Test func aServiceFromAServiceFile() async throws {
        let services = try Self.temporaryFile("""
            [contextdb_test]
            host=\(TestCluster.host)
            port=\(TestCluster.port)
            user=\(TestCluster.user)
            password=\(TestCluster.password)
            dbname=\(TestCluster.database)
            sslmode=disable

            """)
        defer { try? FileManager.default.removeItem(atPath: services) }
        let served = try await Self.withEnvironment(["PGSERVICEFILE": services]) { try await Self.serverPort("service=contextdb_test") }
        #expect(served.port == TestCluster.port)
    }

    /// The cluster's servers listen on a socket in `PG_CLUSTER_DIR` too (`scripts/pg-cluster.sh`).
    @Test(.enabled(if: ProcessInfo.processInfo.environment["PG_CLUSTER_DIR"] != nil))
    func aUnixSocketHost() async throws {
        let directory = try #require(ProcessInfo.processInfo.environment["PG_CLUSTER_DIR"])
        let connect = try running(DBConnect(
            label: "socket", conninfo: "host=\(directory) port=\(TestCluster.port) user=\(TestCluster.user) dbname=\(TestCluster.database)"
        ))
        let (address, server) = try await connect.withSession { session in
            try (await session.queryValue("SELECT coalesce(inet_server_addr()::text, 'socket')", as: String.self),
                 try await session.withConnection { $0.server })
        }
        #expect(address == "socket", "no TCP address: a Unix-domain socket")
        #expect(server.hasPrefix(directory))
        await connect.close()
    }

    @Test func targetSessionAttrsPicksThePrimaryOrAStandbyAtConnect() async throws {
        try #require(!TestCluster.replicaPorts.isEmpty)
        let hosts = (TestCluster.replicaPorts + [TestCluster.port]).map { _ in TestCluster.host }.joined(separator: ",")
        let ports = (TestCluster.replicaPorts + [TestCluster.port]).map(String.init).joined(separator: ",")
        let base = "host=\(hosts) port=\(ports) user=\(TestCluster.user) password=\(TestCluster.password) dbname=\(TestCluster.database) sslmode=disable"
        let primary = try await Self.serverPort("\(base) target_session_attrs=read-write")
        #expect(primary.port == TestCluster.port && primary.replica == false)
        let standby = try await Self.serverPort("\(base) target_session_attrs=standby")
        #expect(standby.replica == true && TestCluster.replicaPorts.contains(standby.port ?? -1))
    }

    /// `PostgresTopology`'s hooks route a libpq connect as they route a PostgresNIO one:
    /// writes to the primary, a read of the request's own write from a replica that has it.
    @Test func aTopologyRoutesLibPQConnectsWithReadYourWrites() async throws {
        try #require(!TestCluster.replicaPorts.isEmpty)
        var configuration = PostgresTopology.Configuration()
        configuration.probeInterval = .milliseconds(100)
        configuration.probeTimeout = .seconds(5)
        let url = TestCluster.clusterURL()
        let topology = running(try PostgresTopology(url: url, configuration: configuration))
        let primary = try running(DBConnect(
            label: "primary", conninfo: url, readYourWrites: true, chooseHost: topology.primaryHook(for: LibPQEngine.self)
        ))
        let replica = try running(DBConnect(
            label: "replica", conninfo: url, options: DBSessionOptions(readOnly: true),
            chooseHost: topology.replicaHook(for: LibPQEngine.self, fallbackToPrimary: false, readYourWritesWait: .seconds(5))
        ))
        let table = "libpq_routed_\(UInt32.random(in: 0...UInt32.max))"
        try await withDBContext { try await primary.session().execute("CREATE TABLE \(unescaped: table) (text text)") }
        let (written, read, readOn) = try await withDBContext {
            let session = try await primary.session()
            try await session.execute("INSERT INTO \(unescaped: table) VALUES ('mine')")
            try await primary.commit()
            let reader = try await replica.session()
            return (
                session.host,
                try await reader.queryValue("SELECT text FROM \(unescaped: table)", as: String.self),
                reader.host
            )
        }
        #expect(written == TestCluster.primaryEndpoint)
        #expect(TestCluster.replicaEndpoints.contains(readOn))
        #expect(read == "mine", "the replica had replayed the request's own write")
        try await withDBContext { try await primary.session().execute("DROP TABLE \(unescaped: table)") }
        for connect in [primary, replica] { await connect.close() }
    }
}
