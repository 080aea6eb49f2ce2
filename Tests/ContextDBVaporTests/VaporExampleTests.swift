import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ContextDBTesting
import ContextDBVapor
import ExampleTestSupport
import Foundation
import Logging
import PostgresNIO
import Testing
import TestSupport
import Vapor
import VaporTesting

@testable import ContextDBVaporExample

/// The Vapor example over HTTP against the real primary and replicas, on the contract the
/// Hummingbird example's tests check. Nested in `ExampleTests`: one test at a time with the
/// Hummingbird example's suites, which use the same tables.
extension ExampleTests {
@Suite(.timeLimit(.minutes(5)))
struct VaporExampleTests {
    /// Builds the Vapor example on empty tables and runs `body` with its database and app; the
    /// app boots on its first request and is shut down (engines closed) at the end.
    static func withVaporExample<R>(
        extraRoutes: (Application, ExampleDatabase) -> Void = { _, _ in },
        _ body: (ExampleDatabase, Application) async throws -> R
    ) async throws -> R {
        let database = try ExampleDatabase(url: ExampleHarness.databaseURL, logger: Logger(label: "test"))
        try await ExampleHarness.emptyTables()
        return try await withApp { app in
            try configure(app, database: database, port: 0)
            extraRoutes(app, database)
            try await app.asyncBoot()  // as `execute()` does: starts the connects, creates the tables
            return try await body(database, app)
        }
    }

    static func body(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }
    static let jsonHeaders: HTTPHeaders = ["Content-Type": "application/json"]

    @Test func theNineRoutesMatchTheOriginal() async throws {
        for route in exampleRoutes {
            try await Self.withVaporExample { database, app in
                try await app.testing().test(.POST, route.path) { response in
                    #expect(Int(response.status.code) == route.status, "\(route.path)")
                    let cookie = response.headers.first(name: .setCookie)
                    #expect((cookie?.hasPrefix("X-WAL-LSN=") ?? false) == route.cookie, "\(route.path): \(cookie ?? "no cookie")")
                    #expect((response.headers.first(name: "X-WAL-LSN") != nil) == route.cookie, "\(route.path)")
                }
                #expect(try await ExampleHarness.rows(in: "example") == route.rows, "\(route.path)")
                #expect(ExampleHarness.leased(database) == 0)
            }
        }
        try await ExampleHarness.expectNoBusyConnections()
    }

    @Test func itemsAreWrittenOnThePrimaryAndReadYourOwnWritesFollowsTheCookie() async throws {
        try await Self.withVaporExample { database, app in
            let tester = try app.testing()
            var cookie = ""
            var id: Int?
            try await tester.test(.POST, "/items", headers: Self.jsonHeaders, body: Self.body(#"{"text":"first"}"#)) { response in
                #expect(response.status == .created)
                cookie = response.headers.first(name: .setCookie)?.split(separator: ";").first.map(String.init) ?? ""
                id = json(response.body.readableBytesView)["id"] as? Int
            }
            #expect(id == 1)
            #expect(cookie.hasPrefix("X-WAL-LSN="))
            // The cookie makes the read wait for a replica that has the row (or, past the wait,
            // go to the primary): found at once, never a 404.
            try await tester.test(.GET, "/items/1", headers: ["Cookie": cookie]) { response in
                #expect(response.status == .ok)
                let item = json(response.body.readableBytesView)
                #expect(item["text"] as? String == "first")
                let hosts = ExampleHarness.replicaEndpoints + [ExampleHarness.primaryEndpoint]
                #expect(hosts.contains(item["served_by"] as? String ?? "none"))
            }
            try await tester.test(.GET, "/items/99999") { response in
                #expect(response.status == .notFound)
                #expect((json(response.body.readableBytesView)["error"] as? [String: Any])?["message"] as? String == "no item 99999")
            }
            try await tester.test(.POST, "/items/write_then_read", headers: Self.jsonHeaders, body: Self.body(#"{"text":"wr"}"#)) { response in
                #expect(response.status == .ok)
                #expect(json(response.body.readableBytesView)["found"] as? Bool == true)
            }
            try await tester.test(.GET, "/health") { response in
                #expect(response.status == .ok)
                #expect(json(response.body.readableBytesView)["status"] as? String == "ok")
            }
            try await tester.test(.GET, "/health/live") { #expect(json($0.body.readableBytesView)["status"] as? String == "live") }
            try await tester.test(.GET, "/health/ready") { #expect(json($0.body.readableBytesView)["status"] as? String == "ready") }
            try await tester.test(.GET, "/topology") { response in
                #expect(response.status == .ok)
                let hosts = (try? JSONSerialization.jsonObject(with: Data(response.body.readableBytesView))) as? [[String: Any]]
                #expect(hosts?.contains { $0["role"] as? String == "primary" && $0["host"] as? String == ExampleHarness.primaryEndpoint } == true)
            }
            #expect(try await ExampleHarness.rows(in: "items") == 2)
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    @Test func refusalsAnswerAsTheHummingbirdExampleDoes() async throws {
        try await Self.withVaporExample { database, app in
            let tester = try app.testing()
            for refusal in exampleRefusals {
                try await tester.test(
                    HTTPMethod(rawValue: refusal.method), refusal.path, headers: Self.jsonHeaders, body: refusal.body.map(Self.body)
                ) { response in
                    #expect(Int(response.status.code) == refusal.status, "\(refusal.path) \(refusal.body ?? "")")
                    let message = errorMessage(response.body.readableBytesView) ?? "no message"
                    #expect(message.hasPrefix(refusal.message), "\(refusal.path) \(refusal.body ?? ""): \(message)")
                }
            }
            #expect(try await ExampleHarness.rows(in: "items") == 0)
        }
    }

    /// What a client sees when the database cannot serve, as in the Hummingbird example.
    @Test(.runsServices) func databaseFailuresAnswer503Or409() async throws {
        let down = try running(DBConnect(label: "down", url: TestCluster.url(port: 1, query: "sslmode=disable&connect_timeout=2")))
        try await Self.withVaporExample(extraRoutes: { app, database in
            app.post("replica_write") { _ async throws -> HTTPStatus in
                try await database.replica.session().execute("INSERT INTO items (text) VALUES ('x')")
                return .ok
            }
            app.get("down") { _ async throws -> HTTPStatus in
                try await down.session().execute("SELECT 1")
                return .ok
            }
        }) { database, app in
            let tester = try app.testing()
            database.primary.preventsWrites = true
            try await tester.test(.POST, "/items", headers: Self.jsonHeaders, body: Self.body(#"{"text":"x"}"#)) { response in
                #expect(response.status == .serviceUnavailable)
                #expect(response.headers.first(name: .retryAfter) == "1")
                #expect(errorMessage(response.body.readableBytesView) == "writes are paused for maintenance; retry later")
            }
            try await tester.test(.GET, "/health") { #expect($0.status == .ok, "reads keep working") }
            database.primary.preventsWrites = false
            try await tester.test(.POST, "/items", headers: Self.jsonHeaders, body: Self.body(#"{"text":"x"}"#)) { #expect($0.status == .created) }
            try await tester.test(.POST, "/replica_write") { #expect($0.status == .conflict) }
            try await tester.test(.GET, "/down") { response in
                #expect(response.status == .serviceUnavailable)
                #expect(response.headers.first(name: .retryAfter) == "1")
                #expect(errorMessage(response.body.readableBytesView) == "the database cannot serve this request now; retry later")
            }
            #expect(try await ExampleHarness.rows(in: "items") == 1)
        }
        await down.close()
    }

    /// A commit the server refuses (a deferred unique constraint) answers 500, never 2xx.
    @Test func aFailedCommitIsA500AndLeavesNothing() async throws {
        try await ExampleHarness.withAdmin { admin in
            try await admin.withTransaction { session in
                try await session.execute(
                    "CREATE TABLE IF NOT EXISTS vapor_deferred (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)"
                )
                try await session.execute("TRUNCATE vapor_deferred")
            }
        }
        try await Self.withVaporExample(extraRoutes: { app, database in
            app.post("deferred") { _ async throws -> HTTPStatus in
                let session = try await database.primary.session()
                try await session.execute("INSERT INTO vapor_deferred VALUES (1), (1)")  // fails only at COMMIT
                return .created
            }
        }) { database, app in
            try await app.testing().test(.POST, "/deferred") { response in
                #expect(response.status == .internalServerError)
            }
            #expect(try await ExampleHarness.rows(in: "vapor_deferred") == 0)
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    /// Routes that lose the task-local context — an `EventLoopFuture` route behind Vapor's
    /// `SessionsMiddleware`, which calls on through a future — reach it through the request.
    @Test func futureRoutesBehindSessionsMiddlewareUseTheRequestsContext() async throws {
        try await Self.withVaporExample(extraRoutes: { app, database in
            let sessions = app.grouped(app.sessions.middleware)
            sessions.post("future", ":status") { request -> EventLoopFuture<Response> in
                let status = request.parameters.get("status", as: Int.self) ?? 200
                return request.eventLoop.makeFutureWithTask {
                    // No task-local context here: the request's own, or a 417 the test sees.
                    guard request.dbContext != nil else { return Response(status: .expectationFailed) }
                    let session = try await request.dbSession(database.primary)
                    try await session.execute("INSERT INTO example (text) VALUES ('future')")
                    return Response(status: HTTPResponseStatus(statusCode: status))
                }
            }
            sessions.post("async") { request async throws -> HTTPStatus in
                try await request.withDBContext {
                    try await database.primary.session().execute("INSERT INTO example (text) VALUES ('async')")
                }
                return .ok
            }
        }) { database, app in
            let tester = try app.testing()
            try await tester.test(.POST, "/future/200") { response in
                #expect(response.status == .ok)
                #expect(response.headers.first(name: .setCookie)?.contains("X-WAL-LSN=") == true, "one cookie for the LSN")
            }
            #expect(try await ExampleHarness.rows(in: "example") == 1, "committed with the request")
            try await tester.test(.POST, "/future/409") { #expect($0.status == .conflict) }
            #expect(try await ExampleHarness.rows(in: "example") == 1, "rolled back with the 409")
            try await tester.test(.POST, "/async") { #expect($0.status == .ok) }
            #expect(try await ExampleHarness.rows(in: "example") == 2)
            #expect(ExampleHarness.leased(database) == 0)
        }
    }

    /// The transactional test style of ContextDBTesting through Vapor's test client: the app's
    /// transactions are savepoints on the test's connection, and nothing stays.
    @Test func transactionalTestsWorkThroughVaporsTestClient() async throws {
        try await Self.withVaporExample { database, app in
            let tester = try app.testing()
            for route in exampleRoutes where route.path != "/concurrent_queries" {
                try await withTransactionalTest(database.primary, replicas: [database.replica]) {
                    try await tester.test(.POST, route.path) { response in
                        #expect(Int(response.status.code) == route.status, "\(route.path)")
                    }
                    let rows = try await database.primary.session().queryValue("SELECT count(*)::int FROM example", as: Int.self)
                    #expect(rows == route.rows, "\(route.path), seen inside the test")
                }
                #expect(try await ExampleHarness.rows(in: "example") == 0, "\(route.path): rolled back")
            }
        }
    }

    /// 500 concurrent mixed requests over real connections to the running server.
    @Test func fiveHundredConcurrentMixedRequests() async throws {
        try await Self.withVaporExample { database, app in
            try await app.asyncBoot()
            try await app.server.start(address: .hostname("127.0.0.1", port: 0))
            let port = try #require(app.http.server.shared.localAddress?.port)
            let client = app.client
            let outcomes = try await withThrowingTaskGroup(of: (String, Int).self) { group in
                for index in 0..<500 {
                    group.addTask {
                        let route = exampleRoutes[index % exampleRoutes.count]
                        let path = index % 3 == 0 ? "/items" : route.path
                        let response = try await client.post(URI(string: "http://127.0.0.1:\(port)\(path)")) { request in
                            if path == "/items" { try request.content.encode(["text": "load"], as: .json) }
                        }
                        return (path, Int(response.status.code))
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            await app.server.shutdown()
            #expect(outcomes.count == 500)
            var expectedRows = 0
            for (path, status) in outcomes {
                if let route = exampleRoutes.first(where: { $0.path == path }) {
                    #expect(status == route.status, "\(path)")
                    expectedRows += route.rows
                } else {
                    #expect(status == 201, "\(path)")
                }
            }
            #expect(try await ExampleHarness.rows(in: "example") == expectedRows)
            #expect(try await ExampleHarness.rows(in: "items") == outcomes.filter { $0.0 == "/items" }.count)
            #expect(ExampleHarness.leased(database) == 0)
        }
        try await ExampleHarness.expectNoBusyConnections()
    }

    /// The application's shutdown stops the connects: every engine shut down, no connection left
    /// on the server.
    @Test func shutdownClosesEveryEngine() async throws {
        let database = try await Self.withVaporExample { database, app in
            try await app.testing().test(.POST, "/items", headers: Self.jsonHeaders, body: Self.body(#"{"text":"x"}"#)) {
                #expect($0.status == .created)
            }
            #expect(!database.primary.engines.isEmpty)
            return database
        }
        #expect(database.primary.engines.isEmpty && database.replica.engines.isEmpty)
        try await eventually("the example's connections are closed") {
            try await ExampleHarness.withAdmin { admin in
                try await admin.withSession { session in
                    try await session.queryValue(
                        "SELECT count(*)::int FROM pg_stat_activity WHERE application_name = \(ExampleHarness.applicationName)", as: Int.self
                    )
                }
            } == 0
        }
    }

    /// A client that hangs up while its request is in a transaction: the request still ends
    /// (committed), and leaves no connection idle in a transaction and no lease taken.
    @Test func aClientThatHangsUpLeavesNothingBehind() async throws {
        try await Self.withVaporExample(extraRoutes: { app, database in
            app.post("slow") { _ async throws -> HTTPStatus in
                try await database.primary.session().execute("INSERT INTO example (text) VALUES ('slow')")
                try await Task.sleep(for: .seconds(1))
                return .ok
            }
        }) { database, app in
            try await app.asyncBoot()
            try await app.server.start(address: .hostname("127.0.0.1", port: 0))
            let port = try #require(app.http.server.shared.localAddress?.port)
            for _ in 0..<5 {
                _ = try? await app.client.post(URI(string: "http://127.0.0.1:\(port)/slow")) { $0.timeout = .milliseconds(100) }
            }
            // Vapor runs a handler to its end when its client hangs up: each committed.
            try await eventually("every slow request ended") { try await ExampleHarness.rows(in: "example") == 5 }
            try await eventually("every lease was freed") { ExampleHarness.leased(database) == 0 }
            try await ExampleHarness.expectNoBusyConnections()
            await app.server.shutdown()
        }
    }
}
}
