import ContextDB
import ContextDBHummingbird
import ContextDBPostgres
import ContextDBTesting
import Foundation
import Hummingbird
import HummingbirdTesting
import MetricsTestKit
import ServiceLifecycle
import Testing
import TestSupport

// The Swift blocks of the DocC articles (`Sources/*/Docs.docc/*.md`), compiled by the test
// command. `DocCSnippetTests` checks that every line of every block appears here, in order, so
// the articles cannot drift from code that compiles. Nothing here runs: each block is a function
// body, with what the article leaves out (helpers, the app) defined around it.

enum DocCSnippets {
    static func makeEngine(_ host: String) async throws -> PostgresEngine {
        try PostgresEngine(url: PostgresURL("postgresql://app@\(host)/app"))
    }
    static func insertItem(_ session: DBSession<PostgresEngine>) async throws {}
    static func insertAudit(_ session: DBSession<PostgresEngine>) async throws {}
    static func countOrders(_ session: DBSession<PostgresEngine>) async throws -> Int { 0 }
    static func countUsers(_ session: DBSession<PostgresEngine>) async throws -> Int { 0 }

    /// ContextDB.md
    static func contextDBOverview() async throws {
        let primary = DBConnect(label: "primary", host: "127.0.0.1:5432") { host in
            try await makeEngine(host)          // created on first use, one per host
        }

        try await withDBContext {               // what DBSessionMiddleware does per request
            let session = try await primary.session()
            try await insertItem(session)       // leases a connection, BEGIN, INSERT
            try await primary.atomic(.commit) { session in
                try await insertAudit(session)  // its own transaction, committed at the end
            }
        }                                       // COMMIT, connection back to the pool
    }

    /// ObservingContextDB.md
    static func observing() {
        let metrics = TestMetrics()                 // MetricsTestKit
        let primary = DBConnect(label: "primary", host: "127.0.0.1:5432",
                                instrumentation: DBInstrumentation(metricsFactory: metrics)) { host in
            try await makeEngine(host)
        }
        _ = primary
    }

    /// HowTheRequestContextWorks.md
    static func oneTaskAtATime(primary: DBConnect<PostgresEngine>) async throws {
        async let a = withDBContext { try await countOrders(primary.session()) }
        async let b = primary.withSession { try await countUsers($0) }
        _ = try await (a, b)
    }

    /// ContextDBHummingbird.md
    static func hummingbirdOverview(primary: DBConnect<PostgresEngine>) {
        struct NewItem: Decodable { let text: String }
        let router = Router()
        router.add(middleware: DBSessionMiddleware())
        router.post("/items") { request, context -> HTTPResponse.Status in
            let item = try await request.decode(as: NewItem.self, context: context)
            try await primary.session().execute("INSERT INTO items (text) VALUES (\(item.text))")
            return .created
        }
    }

    /// ContextDBPostgres.md
    static func postgresOverview(text: String) async throws {
        let primary = try DBConnect(label: "primary",
                                    url: "postgresql://app:secret@127.0.0.1:5432/app?sslmode=disable")
        let replica = try DBConnect(label: "replica",
                                    url: "postgresql://app:secret@127.0.0.1:5433/app?sslmode=disable",
                                    options: DBSessionOptions(readOnly: true))

        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await primary.run() }   // each connect runs its pools: a Service
            group.addTask { try await replica.run() }
            try await withDBContext {
                let id = try await primary.session()
                    .queryValue("INSERT INTO items (text) VALUES (\(text)) RETURNING id", as: Int.self)
                let count = try await replica.session()
                    .queryValue("SELECT count(*) FROM items", as: Int.self)
                print(id ?? 0, count ?? 0)
            }
            group.cancelAll()                           // closes the pools
        }
    }

    /// PrimaryAndReplicas.md
    static func primaryAndReplicas() throws -> [any Service] {
        let url = "postgresql://app:secret@db1:5432,db2:5432,db3:5432/app"
        let topology = try PostgresTopology(url: url)       // run it: a ServiceLifecycle Service

        let primary = try DBConnect(label: "primary", url: url, readYourWrites: true,
                                    chooseHost: topology.primaryHook())
        let replica = try DBConnect(label: "replica", url: url,
                                    options: DBSessionOptions(readOnly: true),
                                    chooseHost: topology.replicaHook(policy: .roundRobin,
                                                                              maximumLagBytes: 16 << 20))
        let services: [any Service] = [topology, primary, replica]   // run them beside the server
        return services
    }

    static func patroniMembers() async throws -> [PostgresEndpoint] { [] }

    /// PrimaryAndReplicas.md, "Hosts that come and go"
    static func hostsThatComeAndGo(url: String) throws -> [PostgresTopology] {
        let topology = try PostgresTopology(
            url: "postgresql://app:secret@db-headless.app.svc:5432/app",
            hosts: .dns(every: .seconds(10))    // one host per address of the name
        )
        let fromPatroni = try PostgresTopology(url: url, hosts: .custom(every: .seconds(5)) {
            try await patroniMembers()          // your code: [PostgresEndpoint]
        })
        return [topology, fromPatroni]
    }
}

/// TestingYourApp.md, compiled with what it names: `db`, `app`, `body`.
@Suite struct DocCTestingSnippet {
    struct Database {
        let primary = try! DBConnect(label: "primary", url: "postgresql://contextdb@127.0.0.1:25432/contextdb?sslmode=disable")
        let replica = try! DBConnect(label: "replica", url: "postgresql://contextdb@127.0.0.1:25433/contextdb?sslmode=disable")
    }
    let db = Database()
    var body: ByteBuffer { ByteBuffer(string: #"{"text":"hello"}"#) }
    var app: some ApplicationProtocol { Application(router: Router()) }

    @Test(.disabled("compiled, not run: the article's snippet")) func createsAnItem() async throws {
        try await app.test(.router) { client in               // runs the app's services: its connects
            try await withTransactionalTest(db.primary, replicas: [db.replica]) {
                try await client.execute(uri: "/items", method: .post, body: body) { #expect($0.status == .created) }
                let count = try await db.primary.session().queryValue("SELECT count(*)::int FROM items", as: Int.self)
                #expect(count == 1)
            }   // rolled back
        }
    }
}

/// Every line of every Swift block of the DocC articles appears in this file, in order.
@Suite struct DocCSnippetTests {
    @Test func everySwiftBlockOfTheArticlesIsCompiledHere() throws {
        // ContextDBVapor's and ContextDBLibPQ's articles are compiled in their own tests
        // (VaporDocCSnippets.swift, LibPQDocCSnippets.swift).
        let articles = try FileManager.default.subpathsOfDirectory(atPath: SnippetCheck.root.appendingPathComponent("Sources").path)
            .filter { $0.contains(".docc/") && $0.hasSuffix(".md") && !$0.hasPrefix("ContextDBVapor/") && !$0.hasPrefix("ContextDBLibPQ/") }
            .map { SnippetCheck.root.appendingPathComponent("Sources").appendingPathComponent($0) }
        #expect(articles.count >= 9)
        let blocks = try SnippetCheck.expectEveryBlockCompiled(of: articles, in: URL(fileURLWithPath: #filePath))
        #expect(blocks >= 7)
    }
}
