import ContextDB
import ContextDBPostgres
import PostgresNIO
import Testing
import TestSupport

@Suite struct PostgresURLTests {
    @Test func parsesSeveralHostsAndParameters() throws {
        let url = try PostgresURL(
            "postgresql://app%40corp:p%3Ass@db1:5432,db2:6543,[::1]/shop?sslmode=require&application_name=api&connect_timeout=3"
        )
        #expect(url.username == "app@corp")
        #expect(url.password == "p:ss")
        #expect(url.endpoints.map(\.description) == ["db1:5432", "db2:6543", "[::1]:5432"])
        #expect(url.database == "shop")
        #expect(url.sslMode == .require)
        #expect(url.applicationName == "api")
        #expect(url.connectTimeout == .seconds(3))
        #expect(!url.description.contains("p:ss"))
        #expect(url.description.contains("***"))
    }

    @Test(arguments: [
        ("mysql://u:secretpw@h/db", DBError.Code.invalidConfiguration),
        ("postgresql://u:secretpw@/db", .emptyHost),
        ("postgresql://u:secretpw@h:notaport/db", .invalidConfiguration),
        ("postgresql://u:secretpw@h:70000/db", .invalidConfiguration),
        ("postgresql://u:secretpw@h/db?sslmode=maybe", .invalidConfiguration),
        ("postgresql://u:secretpw@h/db?colour=blue", .invalidConfiguration),
        ("postgresql://:secretpw@h/db", .invalidConfiguration),
        ("postgresql://u:secretpw@h,,h2/db", .emptyHost),
    ])
    func rejectsMalformedURIsWithoutEchoingThePassword(uri: String, code: DBError.Code) async throws {
        let error = await expectDBError(code) { _ = try DBConnect(label: "primary", url: uri) }
        #expect(error?.description.contains("secretpw") == false)
        #expect(error?.connect == "primary")
    }
}

@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct PostgresBadInputTests {
    let password = "Wr0ng-S3cret"

    func connectError(_ url: String) async -> DBError? {
        let connect = try! running(DBConnect(label: "primary", url: url))
        let started = ContinuousClock.now
        let error = await expectDBError(.connectionFailed) {
            try await withDBContext { try await connect.session().execute("SELECT 1") }
        }
        // Bounded by the URI's connect_timeout=2 (probe after ≤ 1 s, then ≤ 2 s to fail).
        #expect(started.duration(to: .now) < .seconds(10))
        await connect.close()
        #expect(error?.description.contains(password) == false)
        return error
    }

    @Test func aClosedPortNamesTheHost() async throws {
        let url = TestCluster.url(port: 1, password: password, query: "sslmode=disable&connect_timeout=2")
        let error = await connectError(url)
        #expect(error?.host == "\(TestCluster.host):1")
        #expect(error?.message.contains("could not reach the server") == true)
    }

    @Test func aWrongPasswordSaysSo() async throws {
        let url = TestCluster.url(password: password, query: "sslmode=disable&connect_timeout=2")
        let error = await connectError(url)
        #expect(error?.message.contains("password authentication failed") == true)
        #expect(error?.host == "\(TestCluster.host):\(TestCluster.port)")
    }

    @Test func anUnknownDatabaseSaysSo() async throws {
        let url = TestCluster.url(password: TestCluster.password, database: "no_such_db", query: "sslmode=disable&connect_timeout=2")
        let connect = try running(DBConnect(label: "primary", url: url))
        let error = await expectDBError(.connectionFailed) {
            try await withDBContext { try await connect.session().execute("SELECT 1") }
        }
        await connect.close()
        #expect(error?.message.contains("\"no_such_db\" does not exist") == true)
        #expect(error?.description.contains(TestCluster.password + "@") == false)
    }

    @Test func aConnectNobodyRunsFailsItsLeasesWithAClearError() async throws {
        let connect = try DBConnect(url: TestCluster.primaryURL, leaseTimeout: .milliseconds(300))  // not running()
        let error = await expectDBError(.notRunning) {
            try await withDBContext { try await connect.session().execute("SELECT 1") }
        }
        #expect(error?.message.contains("run its DBConnect") == true)
        await connect.close()
    }

    @Test func anEmptyHostIsRefusedByTheConnect() async throws {
        let connect = try running(DBConnect(url: TestCluster.primaryURL))
        await expectDBError(.emptyHost) { try connect.changeHost("") }
        await connect.close()
    }
}
