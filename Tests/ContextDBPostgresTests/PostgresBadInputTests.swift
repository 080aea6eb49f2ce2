import ContextDB
import ContextDBPostgres
import Foundation
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

    /// A throwaway self-signed certificate and its key (PEM), written to a temporary file each:
    /// the parser reads `sslcert` and `sslkey`.
    static let certificatePEM = """
        -----BEGIN CERTIFICATE-----
        MIIBkTCCATegAwIBAgIUF9gj6M8RjRZu/h5muowd5VEw3lowCgYIKoZIzj0EAwIw
        HTEbMBkGA1UEAwwSQ29udGV4dERCIFVSTCB0ZXN0MCAXDTI2MTEzMDEzMjUxMVoY
        DzIxMjYxMTA2MTMyNTExWjAdMRswGQYDVQQDDBJDb250ZXh0REIgVVJMIHRlc3Qw
        WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASsa/xfxKNAq+6UIlGRQiC96BIsxeiW
        88N9F6hnxl7vVthmE4NIH2wW8buszMLs9izI65p5XRWXmm2+3QwWaA+8o1MwUTAd
        BgNVHQ4EFgQUtoIs3FAOP2kmdIJQ7H+i5K4s/QkwHwYDVR0jBBgwFoAUtoIs3FAO
        P2kmdIJQ7H+i5K4s/QkwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
        AiAWSSJ/LCsv8WCx6Ol+iIvBkO6XIbQl5zLG2c1p85ev6AIhAMoe54nQWVVApjxW
        h38MOt5Rz8HUgKNqiQ0Fx8TtY12g
        -----END CERTIFICATE-----
        """
    static let keyPEM = """
        -----BEGIN PRIVATE KEY-----
        MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQggzCIBf78boo/1VHd
        6DbC4fe3iiEBHsAQSozZ/D+/z2+hRANCAASsa/xfxKNAq+6UIlGRQiC96BIsxeiW
        88N9F6hnxl7vVthmE4NIH2wW8buszMLs9izI65p5XRWXmm2+3QwWaA+8
        -----END PRIVATE KEY-----
        """
    static func temporaryFile(_ contents: String, _ name: String) throws -> String {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("contextdb-url-test-\(UInt32.random(in: 0...UInt32.max))-\(name)").path
        try contents.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func readsTheTLSFileParametersAsLibpqDoes() throws {
        let certificate = try Self.temporaryFile(Self.certificatePEM, "client.crt")
        let key = try Self.temporaryFile(Self.keyPEM, "client.key")
        defer { for file in [certificate, key] { try? FileManager.default.removeItem(atPath: file) } }
        let url = try PostgresURL(
            "postgresql://u@h/db?sslmode=require&sslrootcert=\(certificate)&sslcert=\(certificate)&sslkey=\(key)"
        )
        #expect(url.sslMode == .require)
        #expect(url.sslRootCert == certificate)
        #expect(url.sslCert == certificate && url.sslKey == key)
        #expect(url.description.contains("sslrootcert=\(certificate)"))
        // `system` means the system's CAs, and makes verify-full the default (libpq 16).
        #expect(try PostgresURL("postgresql://u@h/db?sslrootcert=system").sslMode == .verifyFull)
    }

    @Test func aClientCertificateNeedsItsKey() async throws {
        let certificate = try Self.temporaryFile(Self.certificatePEM, "client.crt")
        defer { try? FileManager.default.removeItem(atPath: certificate) }
        let error = await expectDBError(.invalidConfiguration) {
            _ = try PostgresURL("postgresql://u@h/db?sslmode=require&sslcert=\(certificate)")
        }
        #expect(error?.message.contains("sslcert and sslkey go together") == true)
    }

    @Test(arguments: [
        ("sslrootcert=/no/such/ca.pem", "sslrootcert \"/no/such/ca.pem\" is not a readable file"),
        ("sslmode=require&sslrootcert=system", "sslrootcert=system requires sslmode=verify-full"),
        ("sslcert=\(#filePath)", "sslcert \"\(#filePath)\" is not a readable PEM file of certificates"),
        ("sslkey=/no/such/key.pem", "sslkey \"/no/such/key.pem\" is not a readable PEM private key"),
    ])
    func rejectsTLSParametersItCannotHonour(query: String, problem: String) async throws {
        let error = await expectDBError(.invalidConfiguration) { _ = try PostgresURL("postgresql://u:secretpw@h/db?\(query)") }
        #expect(error?.message.contains(problem) == true, "\(String(describing: error))")
        #expect(error?.description.contains("secretpw") == false)
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

    @Test func noPasswordForAServerThatAsksForOneSaysSo() async throws {
        let url = "postgresql://\(TestCluster.user)@\(TestCluster.primaryEndpoint)/\(TestCluster.database)?sslmode=disable&connect_timeout=2"
        let error = await connectError(url)
        #expect(error?.message.contains("the server asks for a password and none was given") == true, "\(String(describing: error))")
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
