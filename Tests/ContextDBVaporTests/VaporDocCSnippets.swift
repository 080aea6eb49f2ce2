import ContextDB
import ContextDBPostgres
import ContextDBVapor
import Foundation
import Testing
import TestSupport
import Vapor

// The Swift blocks of ContextDBVapor's DocC articles, compiled by the test command;
// `VaporDocCSnippetTests` checks that every line of every block appears here, in order.
// Nothing here runs.

enum VaporDocCSnippets {
    /// UsingContextDBWithVapor.md
    static func usingContextDBWithVapor(app: Application, url: String) throws {
        let topology = try PostgresTopology(url: url)
        let primary = try DBConnect(label: "primary", url: url, chooseHost: topology.primaryHook())
        let replica = try DBConnect(label: "replica", url: url, options: DBSessionOptions(readOnly: true),
                                    chooseHost: topology.replicaHook())
        app.contextDB.use(topology, primary, replica)      // run from boot to shutdown
        app.middleware.use(DBSessionMiddleware())          // one context per request

        app.post("items") { request async throws -> HTTPStatus in
            try await primary.session().execute("INSERT INTO items (text) VALUES ('a')")
            return .created                                // committed before the response leaves
        }

        app.grouped(app.sessions.middleware).get("items", "count") { request -> EventLoopFuture<String> in
            request.eventLoop.makeFutureWithTask {
                let session = try await request.dbSession(replica)
                let count = try await session.queryValue("SELECT count(*)::int FROM items", as: Int.self)
                return "\(count ?? 0)"
            }
        }
    }
}

/// README.md's "In a Vapor app".
enum VaporReadmeSnippets {
    static func inAVaporApp() async throws {
        struct NewItem: Content { let text: String }

        let app = try await Application.make(.detect())
        let primary = try DBConnect(label: "primary",
            url: "postgresql://contextdb:contextdb@127.0.0.1:25432/contextdb?sslmode=disable")
        app.contextDB.use(primary)                         // runs the connect's pools from boot to shutdown
        app.middleware.use(DBSessionMiddleware())          // one context per request, committed before the response
        app.post("items") { request async throws -> HTTPStatus in
            let item = try request.content.decode(NewItem.self)
            try await primary.session().execute("INSERT INTO items (text) VALUES (\(item.text))")
            return .created                                // < 400: committed; >= 400 or a throw: rolled back
        }
        try await app.execute()
        try await app.asyncShutdown()                      // drains and closes the pools
    }
}

/// README.md's Vapor blocks appear in this file, in order.
@Suite struct VaporReadmeTests {
    @Test func everyVaporBlockOfTheReadmeIsCompiledHere() throws {
        let blocks = try SnippetCheck.expectEveryBlockCompiled(
            of: [SnippetCheck.root.appendingPathComponent("README.md")], in: URL(fileURLWithPath: #filePath),
            including: { $0.contains("ContextDBVapor") }
        )
        #expect(blocks == 1)
    }
}

/// Every line of every Swift block of ContextDBVapor's articles appears in this file, in order.
@Suite struct VaporDocCSnippetTests {
    @Test func everySwiftBlockOfTheVaporArticlesIsCompiledHere() throws {
        let folder = SnippetCheck.root.appendingPathComponent("Sources/ContextDBVapor/Docs.docc")
        let articles = try FileManager.default.contentsOfDirectory(atPath: folder.path)
            .filter { $0.hasSuffix(".md") }.map { folder.appendingPathComponent($0) }
        #expect(articles.count >= 2)
        let blocks = try SnippetCheck.expectEveryBlockCompiled(of: articles, in: URL(fileURLWithPath: #filePath))
        #expect(blocks >= 2)
    }
}
