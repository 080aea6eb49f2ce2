import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import Foundation
import Testing
import TestSupport

// The Swift blocks of ContextDBLibPQ's DocC articles, compiled by the test command;
// `LibPQDocCSnippetTests` checks that every line of every block appears here, in order.
// Nothing here runs.

enum LibPQDocCSnippets {
    /// ContextDBLibPQ.md
    static func overview(text: String) async throws {
        let primary = try DBConnect(label: "primary", conninfo: "service=shop target_session_attrs=read-write")

        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await primary.run() }        // runs the engine's pool: a Service
            try await withDBContext {
                let id = try await primary.session()
                    .queryValue("INSERT INTO items (text) VALUES (\(text)) RETURNING id", as: Int.self)
                print(id ?? 0)
            }                                                // COMMIT, connection back to the pool
            group.cancelAll()
        }
    }

    /// ChoosingAnEngine.md
    static func choosingAnEngine() throws -> [DBConnect<LibPQEngine>] {
        let reports = try DBConnect(label: "reports", conninfo: "service=reports",
                                    options: DBSessionOptions(readOnly: true))
        return [reports]
    }

    /// ChoosingAnEngine.md, "Routing a libpq connect"
    static func routing() throws -> [DBConnect<LibPQEngine>] {
        let url = "postgresql://app@db1,db2,db3/app"
        let topology = try PostgresTopology(url: url)      // probes with PostgresNIO
        let primary = try DBConnect(label: "primary", conninfo: url, readYourWrites: true,
                                    chooseHost: topology.primaryHook(for: LibPQEngine.self))
        let replica = try DBConnect(label: "replica", conninfo: url,
                                    options: DBSessionOptions(readOnly: true),
                                    chooseHost: topology.replicaHook(for: LibPQEngine.self))
        return [primary, replica]
    }
}

/// Every line of every Swift block of ContextDBLibPQ's articles appears in this file, in order.
@Suite struct LibPQDocCSnippetTests {
    @Test func everySwiftBlockOfTheLibPQArticlesIsCompiledHere() throws {
        let folder = SnippetCheck.root.appendingPathComponent("Sources/ContextDBLibPQ/Docs.docc")
        let articles = try FileManager.default.contentsOfDirectory(atPath: folder.path)
            .filter { $0.hasSuffix(".md") }.map { folder.appendingPathComponent($0) }
        #expect(articles.count == 2)
        let blocks = try SnippetCheck.expectEveryBlockCompiled(of: articles, in: URL(fileURLWithPath: #filePath))
        #expect(blocks == 3)
    }
}
