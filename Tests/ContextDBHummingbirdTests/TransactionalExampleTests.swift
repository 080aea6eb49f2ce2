import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ContextDBTesting
import ExampleTestSupport
import Foundation
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import ContextDBExample

/// The example's routes in the transactional style: each test runs inside
/// `withTransactionalTest`, the app's transactions become savepoints on the test's connection,
/// and nothing is left in the database afterwards. (`ExampleAppTests` is the non-transactional
/// style: the app commits for real and the tables are emptied between tests.)
extension ExampleTests {
@Suite(.timeLimit(.minutes(3)))
struct TransactionalExampleTests {
    func count(_ database: ExampleDatabase, _ table: String) async throws -> Int? {
        try await database.primary.session().queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self)
    }

    @Test func everyRouteBehavesAsInProductionAndLeavesNothing() async throws {
        try await ExampleHarness.withExample { database, app in
            try await app.test(.router) { client in
                for route in exampleRoutes {
                    try await withTransactionalTest(database.primary, replicas: [database.replica]) {
                        try await client.execute(uri: route.path, method: .post) { response in
                            #expect(Int(response.status.code) == route.status, "\(route.path)")
                        }
                        let rows = try await count(database, "example")
                        if route.path == "/concurrent_queries" {
                            // Its six concurrent sessions share the test's one connection here: a
                            // commit by one also keeps what the others left pending (even the insert
                            // that production rolls back), a rollback also drops it. Only the
                            // status and the clean database afterwards are exact.
                            #expect((0...6).contains(rows ?? -1))
                        } else {
                            #expect(rows == route.rows, "\(route.path), seen inside the test")
                        }
                    }
                    #expect(try await ExampleHarness.rows(in: "example") == 0, "\(route.path): rolled back")
                }
            }
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    @Test func itemsWrittenAndReadThroughTheSharedConnection() async throws {
        try await ExampleHarness.withExample { database, app in
            try await app.test(.router) { client in
                try await withTransactionalTest(database.primary, replicas: [database.replica]) {
                    let id = try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"tx"}"#)) { response in
                        #expect(response.status == .created)
                        return json(response.body)["id"] as? Int
                    }
                    try await client.execute(uri: "/items/\(id ?? 0)", method: .get) { response in
                        #expect(response.status == .ok, "the replica connect shares the test's connection")
                        #expect(json(response.body)["text"] as? String == "tx")
                    }
                    try await client.execute(uri: "/items/write_then_read", method: .post, body: jsonBody(#"{"text":"wr"}"#)) { response in
                        #expect(json(response.body)["found"] as? Bool == true)
                    }
                    #expect(try await count(database, "items") == 2)
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 0)
        }
    }

    @Test func strictModeCatchesAReadThatNeedsReadYourOwnWrites() async throws {
        try await ExampleHarness.withExample { database, app in
            try await app.test(.router) { client in
                try await withTransactionalTest(database.primary, replicas: [database.replica], replicaMode: .strict) {
                    try await client.execute(uri: "/items/write_then_read", method: .post, body: jsonBody(#"{"text":"wr"}"#)) { response in
                        #expect(response.status == .ok)
                        // The write is only a savepoint: a real replica cannot see it.
                        #expect(json(response.body)["found"] as? Bool == false)
                    }
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 0)
        }
    }
}
}
