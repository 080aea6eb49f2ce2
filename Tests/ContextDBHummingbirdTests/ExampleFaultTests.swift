import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ExampleTestSupport
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing
import TestSupport

@testable import ContextDBExample

/// The example over HTTP while the server ends its connections (issue "A request never hangs…").
extension ExampleTests {
@Suite(.timeLimit(.minutes(3)))
struct ExampleFaultTests {
    static let role = "contextdb_idle_timeout"

    /// The example's URL as a role of the test's own, whose sessions the server ends after
    /// `idle_in_transaction_session_timeout`, set on the role — other tests are untouched.
    static var url: String {
        ExampleHarness.databaseURL.replacingOccurrences(of: "\(TestCluster.user):\(TestCluster.password)@", with: "\(role):\(role)@")
    }

    private func setIdleTimeout(_ value: String?) async throws {
        try await ExampleHarness.withAdmin { admin in
            try await admin.withTransaction { session in
                try await session.execute("""
                    DO $$ BEGIN
                      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '\(unescaped: Self.role)') THEN
                        CREATE ROLE \(unescaped: Self.role) LOGIN PASSWORD '\(unescaped: Self.role)';
                      END IF;
                    END $$
                    """)
                try await session.execute("GRANT CREATE, USAGE ON SCHEMA public TO \(unescaped: Self.role)")
                try await session.execute("GRANT ALL ON TABLE items, example TO \(unescaped: Self.role)")
                try await session.execute("GRANT ALL ON SEQUENCE items_id_seq TO \(unescaped: Self.role)")
                if let value {
                    try await session.execute("ALTER ROLE \(unescaped: Self.role) SET idle_in_transaction_session_timeout = '\(unescaped: value)'")
                } else {
                    try await session.execute("ALTER ROLE \(unescaped: Self.role) RESET idle_in_transaction_session_timeout")
                }
            }
        }
    }

    @Test func everyRequestIsAnsweredWhenTheServerEndsIdleTransactions() async throws {
        try await setIdleTimeout(nil)  // the role exists and may reach the tables
        try await ExampleHarness.withExample(url: Self.url, maximumConnections: 10) { database, app in
            try await app.test(.live) { client in
                // Once the app has started (it creates its tables on start-up, which the
                // timeout would end): new engines, whose connections start with the role's
                // new setting.
                try await setIdleTimeout("1ms")
                await database.primary.close()
                await database.replica.close()
                let port = client.port!
                let outcomes = try await withThrowingTaskGroup(of: (HTTPResponse.Status, Int?).self) { group in
                    for _ in 0..<40 {
                        group.addTask {
                            try await TestClient.withClient(host: "127.0.0.1", port: port) { http in
                                let response = try await http.post("/items", body: jsonBody(#"{"text":"idle"}"#))
                                return (response.status, json(response.body)["id"] as? Int)
                            }
                        }
                    }
                    return try await group.reduce(into: []) { $0.append($1) }
                }
                #expect(outcomes.count == 40, "every request got an answer")
                // A transaction the server ended before anything was committed is a 503 (retry
                // the request); one whose COMMIT it cut off is a 500.
                #expect(outcomes.contains { $0.0 != .created }, "the server ended some transactions")
                #expect(
                    outcomes.allSatisfy { [.created, .internalServerError, .serviceUnavailable].contains($0.0) }, "\(outcomes.map(\.0))"
                )
                let created = outcomes.filter { $0.0 == .created }.compactMap(\.1)
                let ids = try await ExampleHarness.withAdmin { admin in
                    try await admin.withSession { session in
                        try await session.query("SELECT id FROM items").map { try $0.decode(Int.self) }
                    }
                }
                #expect(Set(created).isSubset(of: Set(ids)), "every 201 has its row")
                #expect(ExampleHarness.leased(database) == 0, "every lease was freed")

                // The next request on the same connects works once the server lets it.
                try await setIdleTimeout(nil)
                await database.primary.close()
                let response = try await TestClient.withClient(host: "127.0.0.1", port: port) { http in
                    try await http.post("/items", body: jsonBody(#"{"text":"after"}"#))
                }
                #expect(response.status == .created)
            }
            try await ExampleHarness.expectNoBusyConnections()
        }
    }
}
}
