import ContextDB
import ContextDBExampleSupport
import ContextDBLibPQ
import ContextDBPostgres
import ExampleTestSupport
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Prometheus
import Testing
import TestSupport

@testable import ContextDBExample

/// The example app over HTTP against the real primary and replicas. Serialized: the routes
/// share the example's tables.
extension ExampleTests {
@Suite(.timeLimit(.minutes(5)))
struct ExampleAppTests {
    @Test(arguments: [TestingSetup.router, .live])
    func theNineRoutesMatchTheOriginal(setup: TestingSetup) async throws {
        for route in exampleRoutes {
            try await ExampleHarness.withExample { database, app in
                try await app.test(setup) { client in
                    try await client.execute(uri: route.path, method: .post) { response in
                        #expect(Int(response.status.code) == route.status, "\(route.path)")
                        let cookie = response.headers[.setCookie]
                        #expect((cookie?.hasPrefix("X-WAL-LSN=") ?? false) == route.cookie, "\(route.path): \(cookie ?? "no cookie")")
                    }
                }
                #expect(try await ExampleHarness.rows(in: "example") == route.rows, "\(route.path)")
                #expect(ExampleHarness.leased(database) == 0)
            }
        }
        try await ExampleHarness.expectNoBusyConnections()
    }

    /// `DATABASE_ENGINE=libpq`: the same example on libpq's engine answers the nine routes
    /// with the same statuses and rows, and the items API, read-your-own-writes included.
    @Test func theExampleRunsOnLibPQ() async throws {
        for route in exampleRoutes {
            try await ExampleHarness.withExample(on: LibPQEngine.self) { database, app in
                try await app.test(.router) { client in
                    try await client.execute(uri: route.path, method: .post) { response in
                        #expect(Int(response.status.code) == route.status, "\(route.path)")
                    }
                }
                #expect(try await ExampleHarness.rows(in: "example") == route.rows, "\(route.path)")
                #expect(ExampleHarness.leased(database) == 0)
            }
        }
        try await ExampleHarness.withExample(on: LibPQEngine.self) { database, app in
            try await app.test(.live) { client in
                let id = try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"on libpq"}"#)) { response in
                    #expect(response.status == .created)
                    return json(response.body)["id"] as? Int
                }
                #expect(id == 1)
                let readBack = try await client.execute(
                    uri: "/items/write_then_read", method: .post, body: jsonBody(#"{"text":"mine"}"#)
                ) { json($0.body) }
                #expect(readBack["found"] as? Bool == true, "the replica read found the request's own write")
                try await client.execute(uri: "/items/99999", method: .get) { #expect($0.status == .notFound) }
                try await client.execute(uri: "/health", method: .get) { #expect($0.status == .ok) }
            }
            #expect(ExampleHarness.leased(database) == 0)
        }
        try await ExampleHarness.expectNoBusyConnections()
    }

    @Test func itemsAreWrittenOnThePrimaryAndReadThroughAReplica() async throws {
        try await ExampleHarness.withExample { database, app in
            try await app.test(.live) { client in
                let id = try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"first"}"#)) { response in
                    #expect(response.status == .created)
                    #expect(response.headers[.setCookie]?.hasPrefix("X-WAL-LSN=") == true)
                    return json(response.body)["id"] as? Int
                }
                #expect(id == 1)
                // The replica may lag: retry the read until it has replayed the row.
                var item: [String: Any] = [:]
                for _ in 0..<200 {
                    let (status, body) = try await client.execute(uri: "/items/1", method: .get) { ($0.status, json($0.body)) }
                    if status == .ok { item = body; break }
                    #expect(status == .notFound)
                    try await Task.sleep(for: .milliseconds(20))
                }
                #expect(item["text"] as? String == "first")
                #expect(ExampleHarness.replicaEndpoints.contains(item["served_by"] as? String ?? "none"))

                try await client.execute(uri: "/items/99999", method: .get) { #expect($0.status == .notFound) }
                try await client.execute(uri: "/health", method: .get) { response in
                    #expect(response.status == .ok)
                    #expect(json(response.body)["status"] as? String == "ok")
                }
                try await client.execute(uri: "/health/live", method: .get) { #expect(json($0.body)["status"] as? String == "live") }
                try await client.execute(uri: "/health/ready", method: .get) { #expect(json($0.body)["status"] as? String == "ready") }
            }
        }
    }

    @Test func refusalsAnswerAsTheVaporExampleDoes() async throws {
        try await ExampleHarness.withExample { _, app in
            try await app.test(.router) { client in
                for refusal in exampleRefusals {
                    try await client.execute(
                        uri: refusal.path, method: HTTPRequest.Method(rawValue: refusal.method)!,
                        headers: [.contentType: "application/json"], body: refusal.body.map(jsonBody)
                    ) { response in
                        #expect(Int(response.status.code) == refusal.status, "\(refusal.path) \(refusal.body ?? "")")
                        let message = errorMessage(response.body.readableBytesView) ?? "no message"
                        #expect(message.hasPrefix(refusal.message), "\(refusal.path) \(refusal.body ?? ""): \(message)")
                    }
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 0)
        }
    }

    /// What a client sees when the database cannot serve: 503 with `Retry-After` for writes
    /// prevented and a host out of reach, 409 for a write through the read-only connect — and
    /// never a host name in the body.
    @Test(.runsServices) func databaseFailuresAnswer503Or409() async throws {
        let down = try running(DBConnect(label: "down", url: TestCluster.url(port: 1, query: "sslmode=disable&connect_timeout=2")))
        try await ExampleHarness.withExample(extraRoutes: { router, database in
            router.post("/replica_write") { _, _ -> HTTPResponse.Status in
                try await database.replica.session().execute("INSERT INTO items (text) VALUES ('x')")
                return .ok
            }
            router.get("/down") { _, _ -> HTTPResponse.Status in
                try await down.session().execute("SELECT 1")
                return .ok
            }
        }) { database, app in
            try await app.test(.router) { client in
                database.primary.preventsWrites = true
                try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"x"}"#)) { response in
                    #expect(response.status == .serviceUnavailable)
                    #expect(response.headers[.retryAfter] == "1")
                    #expect(errorMessage(response.body.readableBytesView) == "writes are paused for maintenance; retry later")
                }
                try await client.execute(uri: "/health", method: .get) { #expect($0.status == .ok, "reads keep working") }
                database.primary.preventsWrites = false
                try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"x"}"#)) { #expect($0.status == .created) }
                try await client.execute(uri: "/replica_write", method: .post) { #expect($0.status == .conflict) }
                try await client.execute(uri: "/down", method: .get) { response in
                    #expect(response.status == .serviceUnavailable)
                    #expect(response.headers[.retryAfter] == "1")
                    let message = errorMessage(response.body.readableBytesView) ?? ""
                    #expect(message == "the database cannot serve this request now; retry later")
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 1)
        }
        await down.close()
    }

    /// `GET /metrics` after some traffic: ContextDB's metrics in Prometheus' text format, with
    /// Prometheus' names (underscores for OpenTelemetry's dots) and the serving host.
    @Test func metricsShowWhatTheRouterAndThePoolsDid() async throws {
        try await ExampleHarness.withExample(metrics: PrometheusCollectorRegistry()) { _, app in
            try await app.test(.router) { client in
                for text in ["one", "two"] {
                    try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"\#(text)"}"#)) {
                        #expect($0.status == .created)
                    }
                }
                try await client.execute(uri: "/items/1", method: .get) { _ in }
                let text = try await client.execute(uri: "/metrics", method: .get) { response in
                    #expect(response.status == .ok)
                    return String(buffer: response.body)
                }
                for name in [
                    "db_client_connection_wait_time", "db_client_connection_use_time", "db_client_connection_count",
                    "db_client_connection_pending_requests", "db_client_operation_duration", "contextdb_transactions",
                    "contextdb_routing_decisions", "contextdb_host_health", "contextdb_replica_lag",
                ] {
                    #expect(text.contains(name), "\(name) in /metrics")
                }
                let primary = ExampleHarness.primaryEndpoint.split(separator: ":")
                let commits = text.split(separator: "\n").filter { line in
                    line.hasPrefix("contextdb_transactions") && line.contains(#"db_client_connection_pool_name="primary""#)
                        && line.contains(#"server_address="\#(primary[0])""#) && line.contains(#"server_port="\#(primary[1])""#)
                        && line.contains(#"contextdb_transaction_outcome="commit""#)
                }
                // The tables' creation at start-up, then the two writes.
                #expect(commits.count == 1 && commits.first?.hasSuffix(" 3") == true, "three commits on the primary: \(commits)")
                #expect(!text.contains("contextdb:contextdb"), "no credentials")
            }
        }
    }

    @Test func writeThenReadReportsTheReplicaThatServedIt() async throws {
        try await ExampleHarness.withExample { _, app in
            try await app.test(.router) { client in
                try await client.execute(
                    uri: "/items/write_then_read", method: .post, body: jsonBody(#"{"text":"wr"}"#)
                ) { response in
                    #expect(response.status == .ok)
                    let body = json(response.body)
                    #expect(body["id"] as? Int == 1)
                    #expect(body["found"] is Bool)
                    #expect(ExampleHarness.replicaEndpoints.contains(body["served_by"] as? String ?? "none"))
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 1)  // committed before the read
        }
    }

    @Test func badInputIsA400AndWritesNothing() async throws {
        try await ExampleHarness.withExample { _, app in
            try await app.test(.live) { client in
                for (uri, method, body) in [
                    ("/items", HTTPRequest.Method.post, #"{"text":"#),
                    ("/items", .post, #"{"title":"no text"}"#),
                    ("/items/write_then_read", .post, "not json"),
                    ("/items/abc", .get, ""),
                ] {
                    try await client.execute(uri: uri, method: method, body: jsonBody(body)) { response in
                        #expect(response.status == .badRequest, "\(uri) \(body)")
                        let error = json(response.body)["error"] as? [String: Any]
                        #expect((error?["message"] as? String)?.isEmpty == false, "\(uri): a message says what is wrong")
                    }
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 0)
        }
    }

    @Test func aCommitThatFailsGivesA500AndNoRow() async throws {
        try await ExampleHarness.withAdmin { admin in
            try await admin.withTransaction { session in
                try await session.execute("DROP TABLE IF EXISTS deferred_unique")
                try await session.execute("CREATE TABLE deferred_unique (text text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
            }
        }
        try await ExampleHarness.withExample(extraRoutes: { router, database in
            router.post("/test/duplicate") { _, _ -> HTTPResponse.Status in
                let session = try await database.primary.session()
                try await session.execute("INSERT INTO deferred_unique VALUES ('same')")
                try await session.execute("INSERT INTO deferred_unique VALUES ('same')")  // checked at COMMIT
                return .created
            }
        }) { database, app in
            try await app.test(.live) { client in
                try await client.execute(uri: "/test/duplicate", method: .post) { response in
                    #expect(response.status == .internalServerError)
                    #expect(response.headers[.setCookie] == nil)
                }
            }
            #expect(try await ExampleHarness.rows(in: "deferred_unique") == 0)
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    @Test func aCancelledRequestLeavesNoTransactionAndNoLease() async throws {
        let inserted = Signal()
        try await ExampleHarness.withExample(extraRoutes: { router, database in
            router.post("/test/slow") { _, _ -> HTTPResponse.Status in
                try await database.primary.session().execute("INSERT INTO example (text) VALUES ('slow')")
                inserted.fire()
                try await Task.sleep(for: .seconds(60))
                return .ok
            }
        }) { database, app in
            try await app.test(.router) { client in
                let request = Task { try await client.execute(uri: "/test/slow", method: .post) { $0.status } }
                await inserted.wait()
                #expect(ExampleHarness.leased(database) == 1)
                request.cancel()
                let status = try? await request.value
                #expect(status != .ok)
            }
            #expect(ExampleHarness.leased(database) == 0)
            #expect(try await ExampleHarness.rows(in: "example") == 0)
            try await ExampleHarness.expectNoBusyConnections()
        }
    }

    @Test func aThousandWriteThenReadsAtConcurrency32AllFindTheirRow() async throws {
        try await ExampleHarness.withExample { database, app in
            try await app.test(.live) { client in
                let port = client.port!
                let found = try await withThrowingTaskGroup(of: [Bool].self) { group in
                    for worker in 0..<32 {
                        group.addTask {
                            try await TestClient.withClient(host: "127.0.0.1", port: port) { http in
                                var found: [Bool] = []
                                for index in stride(from: worker, to: 1_000, by: 32) {
                                    let response = try await http.post(
                                        "/items/write_then_read", body: jsonBody(#"{"text":"row \#(index)"}"#)
                                    )
                                    #expect(response.status == .ok)
                                    found.append(json(response.body)["found"] as? Bool == true)
                                }
                                return found
                            }
                        }
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                #expect(found.count == 1_000)
                #expect(found.allSatisfy { $0 }, "\(found.filter { !$0 }.count) reads missed their own write")
            }
            #expect(try await ExampleHarness.rows(in: "items") == 1_000)
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    @Test func aTokenSentBackRoutesReadsToAReplicaThatHasTheWrite() async throws {
        try await ExampleHarness.withExample { _, app in
            try await app.test(.live) { client in
                let (id, token) = try await client.execute(uri: "/items", method: .post, body: jsonBody(#"{"text":"mine"}"#)) {
                    (json($0.body)["id"] as? Int, $0.headers[HTTPField.Name("X-WAL-LSN")!])
                }
                #expect(token != nil, "the response carries the token as a header too")
                // With the token, the very next read finds the row: no retry.
                var headers = HTTPFields()
                headers[HTTPField.Name("X-WAL-LSN")!] = token
                try await client.execute(uri: "/items/\(id ?? 0)", method: .get, headers: headers) { response in
                    #expect(response.status == .ok)
                    #expect(json(response.body)["text"] as? String == "mine")
                }
                let cookieHeaders: HTTPFields = [.cookie: "X-WAL-LSN=\(token ?? "")"]
                try await client.execute(uri: "/items/\(id ?? 0)", method: .get, headers: cookieHeaders) { response in
                    #expect(response.status == .ok)
                    #expect(response.headers[.setCookie] == nil, "a read does not move the token")
                }
                // A garbage token is ignored, not an error.
                try await client.execute(uri: "/items/\(id ?? 0)", method: .get, headers: [.cookie: "X-WAL-LSN=drop table"]) { response in
                    #expect(response.status == .ok || response.status == .notFound)
                }
            }
        }
    }

    @Test func topologyShowsThePrimaryAndTheReplicas() async throws {
        try await ExampleHarness.withExample { _, app in
            try await app.test(.router) { client in
                try await client.execute(uri: "/topology", method: .get) { response in
                    #expect(response.status == .ok)
                    let hosts = (try? JSONSerialization.jsonObject(with: Data(response.body.readableBytesView))) as? [[String: Any]] ?? []
                    #expect(hosts.count == 1 + ExampleHarness.replicaEndpoints.count)
                    #expect(hosts.first { $0["role"] as? String == "primary" }?["host"] as? String == ExampleHarness.primaryEndpoint)
                    #expect(hosts.filter { $0["role"] as? String == "replica" }.count == ExampleHarness.replicaEndpoints.count)
                    #expect(hosts.allSatisfy { $0["healthy"] as? Bool == true && $0["lag_bytes"] != nil || $0["role"] as? String == "primary" })
                }
            }
        }
    }

    @Test func fiveHundredConcurrentLiveRequestsKeepEveryPromise() async throws {
        try await ExampleHarness.withExample(maximumConnections: 10) { database, app in
            try await app.test(.live) { client in
                let port = client.port!
                let outcomes = try await withThrowingTaskGroup(of: [(String, HTTPResponse.Status, Int?)].self) { group in
                    for worker in 0..<32 {
                        group.addTask {
                            try await TestClient.withClient(host: "127.0.0.1", port: port) { http in
                                var outcomes: [(String, HTTPResponse.Status, Int?)] = []
                                var index = worker
                                while index < 500 {
                                    defer { index += 32 }
                                    let pick = index % (exampleRoutes.count + 2)
                                    if pick < exampleRoutes.count {
                                        let path = exampleRoutes[pick].path
                                        let response = try await http.post(path, body: ByteBuffer())
                                        outcomes.append((path, response.status, nil))
                                    } else if pick == exampleRoutes.count {
                                        let response = try await http.post("/items", body: jsonBody(#"{"text":"load"}"#))
                                        outcomes.append(("/items", response.status, json(response.body)["id"] as? Int))
                                    } else {
                                        let response = try await http.post("/items/write_then_read", body: jsonBody(#"{"text":"wr"}"#))
                                        outcomes.append(("/items/write_then_read", response.status, json(response.body)["id"] as? Int))
                                    }
                                }
                                return outcomes
                            }
                        }
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                #expect(outcomes.count == 500)
                var expectedExampleRows = 0
                for (path, status, _) in outcomes {
                    if let route = exampleRoutes.first(where: { $0.path == path }) {
                        #expect(Int(status.code) == route.status, "\(path)")
                        expectedExampleRows += route.rows
                    }
                }
                let created = outcomes.filter { $0.0 == "/items" && $0.1 == .created }.compactMap(\.2)
                let writtenThenRead = outcomes.filter { $0.0 == "/items/write_then_read" && $0.1 == .ok }.compactMap(\.2)
                #expect(created.count == outcomes.filter { $0.0 == "/items" }.count)
                #expect(writtenThenRead.count == outcomes.filter { $0.0 == "/items/write_then_read" }.count)
                #expect(try await ExampleHarness.rows(in: "example") == expectedExampleRows)
                let ids = try await ExampleHarness.withAdmin { admin in
                    try await admin.withSession { session in
                        try await session.query("SELECT id FROM items").map { try $0.decode(Int.self) }
                    }
                }
                #expect(Set(ids) == Set(created + writtenThenRead), "every 201 has its row, and no other row exists")
            }
            #expect(ExampleHarness.leased(database) == 0)
            try await ExampleHarness.expectNoBusyConnections()
        }
    }
}
}
