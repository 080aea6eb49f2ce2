import ContextDB
import ContextDBHummingbird
import ContextDBPostgres
import ContextDBTesting
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing
import TestSupport

// The README's Swift blocks, compiled by the test command. `ReadmeTests` checks that every line
// of every block appears here, in order, so the README cannot drift from code that compiles.
// Nothing here runs (the testing snippet is disabled): each block is a function body.

enum ReadmeSnippets {
    static func quickStart() async throws {
        let primary = try DBConnect(label: "primary",
            url: "postgresql://contextdb:contextdb@127.0.0.1:25432/contextdb?sslmode=disable")
        let replica = try DBConnect(label: "replica",
            url: "postgresql://contextdb:contextdb@127.0.0.1:25433/contextdb?sslmode=disable",
            options: DBSessionOptions(readOnly: true))

        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await primary.run() }      // a connect runs its pools: a service
            group.addTask { try await replica.run() }
            try await withDBContext {                      // the middleware does this per request
                let session = try await primary.session()  // no connection yet
                try await session.execute("CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, text text NOT NULL)")
                let id = try await session.queryValue(
                    "INSERT INTO items (text) VALUES (\("hello")) RETURNING id", as: Int.self)  // a bound parameter
                try await primary.commit()                 // early commit; the rest commits at the end
                let rows = try await replica.session().queryValue("SELECT count(*)::int FROM items", as: Int.self)
                print(id ?? 0, rows ?? 0)                  // the replica shows the row once it replayed it
            }                                              // COMMIT, connections back to their pools
            group.cancelAll()                              // stops the connects: their pools close
        }
    }

    static func primaryAndReplicas() throws -> (DBConnect<PostgresEngine>, DBConnect<PostgresEngine>, String) {
        let url = "postgresql://contextdb:contextdb@127.0.0.1:25432,127.0.0.1:25433/contextdb?sslmode=disable"
        let topology = try PostgresTopology(url: url)      // probes every host once it runs: a service
        let primary = try DBConnect(label: "primary", url: url, readYourWrites: true,
                                    chooseHost: topology.primaryHook())
        let replica = try DBConnect(label: "replica", url: url, options: DBSessionOptions(readOnly: true),
                                    chooseHost: topology.replicaHook(policy: .leastLag))
        return (primary, replica, url)
    }

    static func whenTheDatabaseMisbehaves(url: String) throws -> DBConnect<PostgresEngine> {
        let primary = try DBConnect(label: "primary", url: url,
                                    leaseTimeout: .seconds(4),        // waiting for a pooled connection
                                    statementTimeout: .seconds(5))    // each statement, BEGIN, COMMIT, ROLLBACK
        return primary
    }

    static func inAHummingbirdApp() async throws {
        struct NewItem: Decodable { let text: String }

        let primary = try DBConnect(label: "primary",
            url: "postgresql://contextdb:contextdb@127.0.0.1:25432/contextdb?sslmode=disable")
        let router = Router()
        router.add(middleware: DBSessionMiddleware())      // one context per request, committed before the response
        router.post("/items") { request, context -> HTTPResponse.Status in
            let item = try await request.decode(as: NewItem.self, context: context)
            try await primary.session().execute("INSERT INTO items (text) VALUES (\(item.text))")
            return .created                                // < 400: committed; >= 400 or a throw: rolled back
        }
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 8080)),
                              services: [primary])         // runs the connect's pools beside the server
        try await app.runService()                         // serves until SIGINT or SIGTERM, then closes the pools
    }
}

/// The README's testing snippet, compiled with what it names: `app`, `primary`, `replica`, `body`.
@Suite struct ReadmeTestingSnippet {
    static let primary = try! DBConnect(label: "primary", url: "postgresql://contextdb@127.0.0.1:25432/contextdb?sslmode=disable")
    static let replica = try! DBConnect(label: "replica", url: "postgresql://contextdb@127.0.0.1:25433/contextdb?sslmode=disable")
    var primary: DBConnect<PostgresEngine> { Self.primary }
    var replica: DBConnect<PostgresEngine> { Self.replica }
    var body: ByteBuffer { ByteBuffer(string: #"{"text":"hello"}"#) }
    var app: some ApplicationProtocol {
        let router = Router()
        router.add(middleware: DBSessionMiddleware())
        return Application(router: router)
    }

    @Test(.disabled("compiled, not run: the README's testing snippet")) func createsAnItem() async throws {
        try await app.test(.router) { client in
            try await withTransactionalTest(primary, replicas: [replica]) {   // savepoints, rolled back
                try await client.execute(uri: "/items", method: .post, body: body) { #expect($0.status == .created) }
                #expect(try await primary.session().queryValue("SELECT count(*)::int FROM items", as: Int.self) == 1)
            }
        }
    }
}

/// Every line of every Swift block in README.md appears in this file, in order.
@Suite struct ReadmeTests {
    @Test func everySwiftBlockOfTheReadmeIsCompiledHere() throws {
        // Vapor's blocks are compiled in the Vapor tests (VaporDocCSnippets.swift).
        let blocks = try SnippetCheck.expectEveryBlockCompiled(
            of: [SnippetCheck.root.appendingPathComponent("README.md")], in: URL(fileURLWithPath: #filePath),
            including: { !$0.contains("ContextDBVapor") }
        )
        #expect(blocks >= 5)
    }
}

