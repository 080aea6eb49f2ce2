import ContextDB
import ContextDBPostgres
import Foundation
import PostgresNIO
import Testing
import TestSupport

/// TLS and logins against a server of its own (`PG_SSL=on`, `scram-sha-256`): a certificate for
/// the name `localhost` only, signed by a CA made at start; and against the shared cluster,
/// which runs without TLS.
@Suite(.serialized, .enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(3)))
struct TLSAndAuthenticationTests {
    /// The server's `ssl` for the session's own connection (`pg_stat_ssl`).
    static func sessionUsesTLS(_ connect: DBConnect<PostgresEngine>) async throws -> Bool? {
        try await withDBContext {
            try await connect.session().queryValue("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", as: Bool.self)
        }
    }

    /// The error of a session's first statement on `url`.
    static func leaseError(_ url: String) async throws -> DBError? {
        let connect = try running(DBConnect(label: "tls", url: url))
        let error = await expectDBError(.connectionFailed) {
            try await withDBContext { try await connect.session().execute("SELECT 1") }
        }
        await connect.close()
        let text = String(describing: error)
        #expect(!text.contains(".cc:"), "no source path of the build: \(text)")
        #expect(!text.contains(TestCluster.password + "@"))
        return error
    }

    @Test func certificatesFromTheURL() async throws {
        try await ScratchCluster.with(primaryPort: 27492, replicas: 0, tls: true) { cluster in
            let ca = "\(cluster.tlsDirectory)/ca.crt"
            let otherCA = "\(cluster.tlsDirectory)/other-ca.crt"
            func url(host: String, _ query: String, user: String = "\(TestCluster.user):\(TestCluster.password)") -> String {
                "postgresql://\(user)@\(host):\(cluster.primaryPort)/\(TestCluster.database)?connect_timeout=2&\(query)"
            }

            // verify-full with the CA: TLS, checked.
            let verified = try running(DBConnect(label: "tls", url: url(host: "localhost", "sslmode=verify-full&sslrootcert=\(ca)")))
            #expect(try await Self.sessionUsesTLS(verified) == true)
            await verified.close()
            // The same over a socket ContextDB opens itself (keepalives): the name is still checked.
            let keptAlive = try running(DBConnect(
                label: "tls", url: url(host: "localhost", "sslmode=verify-full&sslrootcert=\(ca)&keepalives_idle=60")
            ))
            #expect(try await Self.sessionUsesTLS(keptAlive) == true)
            await keptAlive.close()
            let wrongNameKeptAlive = try await Self.leaseError(url(host: "127.0.0.1", "sslmode=verify-full&sslrootcert=\(ca)&keepalives=1"))
            #expect(wrongNameKeptAlive?.message.contains("does not name the host 127.0.0.1:\(cluster.primaryPort)") == true)

            // Another CA: refused, and the error says it is the certificate and how to fix it.
            let untrusted = try await Self.leaseError(url(host: "localhost", "sslmode=verify-full&sslrootcert=\(otherCA)"))
            #expect(untrusted?.message.contains("TLS: the certificate of localhost:\(cluster.primaryPort) failed verification") == true)
            #expect(untrusted?.message.contains("sslrootcert") == true)

            // The certificate names localhost, not 127.0.0.1: verify-full says which name failed.
            let wrongName = try await Self.leaseError(url(host: "127.0.0.1", "sslmode=verify-full&sslrootcert=\(ca)"))
            #expect(wrongName?.message.contains("does not name the host 127.0.0.1:\(cluster.primaryPort)") == true)
            #expect(wrongName?.message.contains("verify-ca") == true)

            // verify-ca checks the chain only; require with an sslrootcert file does too (libpq's rule).
            let chainOnly = try running(DBConnect(label: "tls", url: url(host: "127.0.0.1", "sslmode=verify-ca&sslrootcert=\(ca)")))
            #expect(try await Self.sessionUsesTLS(chainOnly) == true)
            await chainOnly.close()
            let required = try running(DBConnect(label: "tls", url: url(host: "127.0.0.1", "sslmode=require&sslrootcert=\(ca)")))
            #expect(try await Self.sessionUsesTLS(required) == true)
            await required.close()
            let requiredOther = try await Self.leaseError(url(host: "127.0.0.1", "sslmode=require&sslrootcert=\(otherCA)"))
            #expect(requiredOther?.message.contains("failed verification") == true)

            // A client certificate logs in as the role the server maps it to (pg_hba method cert).
            let client = try running(DBConnect(label: "tls", url: url(
                host: "127.0.0.1",
                "sslmode=require&sslcert=\(cluster.tlsDirectory)/client.crt&sslkey=\(cluster.tlsDirectory)/client.key",
                user: "contextdb_cert"
            )))
            let user = try await withDBContext {
                try await client.session().queryValue("SELECT current_user::text", as: String.self)
            }
            #expect(user == "contextdb_cert")
            await client.close()
        }
    }

    @Test func aWrongPasswordCostsTheServerOneOrTwoFailedLoginsWhicheverInitializer() async throws {
        try await ScratchCluster.with(primaryPort: 27502, replicas: 0) { cluster in
            let log = "\(cluster.directory)/primary/server.log"
            func failedLogins(_ user: String) -> Int {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                return text.components(separatedBy: "password authentication failed for user \"\(user)\"").count - 1
            }
            // A role that does not exist fails as a wrong password does (the server does not tell
            // them apart), and its name is this test's own in the server's log.
            let viaURL = "storm_url_\(UInt32.random(in: 0...UInt32.max))"
            let viaConfiguration = "storm_conf_\(UInt32.random(in: 0...UInt32.max))"
            let byURL = try running(DBConnect(
                label: "storm", url: "postgresql://\(viaURL):wrong@127.0.0.1:\(cluster.primaryPort)/\(TestCluster.database)?sslmode=disable"
            ))
            let byConfiguration = running(DBConnect(label: "storm", configuration: PostgresClient.Configuration(
                host: "127.0.0.1", port: cluster.primaryPort, username: viaConfiguration, password: "wrong",
                database: TestCluster.database, tls: .disable
            )))
            for connect in [byURL, byConfiguration] {
                let started = ContinuousClock.now
                let error = await expectDBError(.connectionFailed) {
                    try await withDBContext { try await connect.session().execute("SELECT 1") }
                }
                #expect(error?.message.contains("password authentication failed") == true, "\(String(describing: error))")
                // The server's reason, not the lease timeout (30 s by default) with a pool-size hint.
                #expect(started.duration(to: .now) < .seconds(10))
            }
            try await Task.sleep(for: .seconds(3))  // idle: a connect with no demand tries nothing
            #expect((1...2).contains(failedLogins(viaURL)), "failed logins for one failing request, then 3 s idle")
            #expect((1...2).contains(failedLogins(viaConfiguration)), "the same through DBConnect(configuration:)")
            await byURL.close()
            await byConfiguration.close()
        }
    }

    @Test func requiringTLSOfAServerWithoutItSaysSo() async throws {
        let url = TestCluster.url(password: TestCluster.password, query: "sslmode=require&connect_timeout=2")
        let error = try await Self.leaseError(url)
        #expect(error?.message.contains("does not accept TLS connections") == true)
        #expect(error?.message.contains("sslmode=prefer") == true)
    }
}
