import ContextDB
import InMemoryTracing
import MetricsTestKit
import Testing
import TestSupport
import Tracing

/// Metrics and spans of the core, with a metrics factory and a tracer of the test's own (no
/// process-wide bootstrap: suites run in parallel).
@Suite(.timeLimit(.minutes(1))) struct InstrumentationTests {
    let metrics = TestMetrics()
    let tracer = InMemoryTracer()

    func connect(label: String = "primary", host: String? = "db1:5432", database: FakeDatabase = FakeDatabase()) -> DBConnect<FakeEngine> {
        DBConnect(label: label, host: host, instrumentation: DBInstrumentation(metricsFactory: metrics, tracer: tracer)) { host in
            try database.makeEngine(host: host)
        }
    }

    var dimensions: [(String, String)] {
        [("db.system.name", "other_sql"), ("db.client.connection.pool.name", "primary"), ("server.address", "db1"), ("server.port", "5432")]
    }

    func transactions(_ outcome: String) -> Int64 {
        metrics.counterTotal(label: DBMetricName.transactions, dimensions: dimensions + [("contextdb.transaction.outcome", outcome)])
    }

    @Test func everyEndedTransactionIsCountedByOutcome() async throws {
        let database = FakeDatabase()
        let primary = connect(database: database)
        for _ in 0..<5 {
            try await withDBContext { try await primary.session().execute("INSERT") }
        }
        #expect(transactions("commit") == 5)
        try await withDBRequest(statusCode: { _ in 500 }) { try await primary.session().execute("INSERT") }
        #expect(transactions("rollback") == 1)
        database.failNext("COMMIT")
        await expectDBError(.commitFailed) {
            try await withDBContext { try await primary.session().execute("INSERT") }
        }
        #expect(transactions("commit_failed") == 1)
        #expect(transactions("commit") == 5, "a failed commit is not a commit")
        #expect(database.committedRows == 5)
    }

    @Test func controlStatementsAreTimedByOperationName() async throws {
        let primary = connect()
        try await withDBContext { try await primary.session().execute("INSERT") }
        for name in ["BEGIN", "COMMIT"] {
            let timer = try metrics.expectTimer(DBMetricName.operationDuration, dimensions + [("db.operation.name", name)])
            #expect(timer.values.count == 1, "\(name)")
        }
        #expect(try metrics.expectTimer(DBMetricName.connectionWaitTime, dimensions).values.count == 1)
        #expect(try metrics.expectTimer(DBMetricName.connectionUseTime, dimensions).values.count == 1, "recorded when the connection went back")
    }

    @Test func aFailedOperationCarriesItsErrorType() async throws {
        let database = FakeDatabase()
        let primary = connect(database: database)
        try await withDBContext {
            let session = try await primary.session()
            try await session.execute("INSERT")
            database.terminateLeasedConnections()
            await expectDBError(.commitFailed) { try await session.commit() }
        }
        let failed = metrics.timers(label: DBMetricName.operationDuration).filter { timer in
            timer.dimensions.contains { $0 == ("error.type", "connectionLost") }
        }
        #expect(failed.count == 1)
        #expect(transactions("commit_failed") == 1)
    }

    @Test func aFailoverToTheNextHostIsCounted() async throws {
        let database = FakeDatabase()
        database.setReachable("db1:5432", false)
        let primary = DBConnect(
            label: "primary", chooseHost: { _ in DBHostChoice("db1:5432", fallbacks: ["db2:5432"]) },
            instrumentation: DBInstrumentation(metricsFactory: metrics, tracer: tracer)
        ) { host in try database.makeEngine(host: host) }
        try await withDBContext { try await primary.session().execute("INSERT") }
        #expect(metrics.counterTotal(label: DBMetricName.failovers, dimensions: dimensions) == 1)
    }

    @Test func aTransactionIsASpanUnderTheRequestsSpanWithTheServingHost() async throws {
        let primary = connect()
        try await tracer.withSpan("POST /items") { _ in
            try await withDBContext {
                try await primary.session().execute("INSERT")
                try await primary.commit()
                try await primary.session().execute("INSERT")
            }  // the second transaction commits here
        }
        let request = try #require(tracer.finishedSpans.first { $0.operationName == "POST /items" })
        let transactions = tracer.finishedSpans.filter { $0.operationName == "transaction" }
        #expect(transactions.count == 2)
        for span in transactions {
            #expect(span.parentSpanID == request.spanID)
            #expect(span.traceID == request.traceID)
            #expect(span.kind == .client)
            #expect(span.attributes.get("db.system.name") == .string("other_sql"))
            #expect(span.attributes.get("server.address") == .string("db1"))
            #expect(span.attributes.get("server.port") == .int64(5432))
            #expect(span.attributes.get("db.client.connection.pool.name") == .string("primary"))
            #expect(span.attributes.get("contextdb.transaction.outcome") == .string("commit"))
            #expect(span.attributes.get("error.type") == nil)
        }
    }

    @Test func theRoutingDecisionIsAnEventOfEachTransactionsSpan() async throws {
        let database = FakeDatabase()
        let replica = DBConnect(
            label: "replica", chooseHost: { _ in DBHostChoice("db2:5432", role: "replica", reason: "token_wait") },
            instrumentation: DBInstrumentation(metricsFactory: metrics, tracer: tracer)
        ) { host in try database.makeEngine(host: host) }
        try await withDBContext {
            try await replica.session().execute("SELECT")
            try await replica.commit()
            try await replica.session().execute("SELECT")
        }
        let spans = tracer.finishedSpans.filter { $0.operationName == "transaction" }
        #expect(spans.count == 2)
        for span in spans {
            let event = try #require(span.events.first { $0.name == "contextdb.routing" })
            #expect(event.attributes.get("contextdb.routing.role") == .string("replica"))
            #expect(event.attributes.get("contextdb.routing.reason") == .string("token_wait"))
            #expect(event.attributes.get("server.address") == .string("db2"))
        }
    }

    @Test func aRolledBackOrFailedTransactionsSpanSaysSo() async throws {
        let database = FakeDatabase()
        let primary = connect(database: database)
        try await withDBRequest(statusCode: { _ in 404 }) { try await primary.session().execute("INSERT") }
        database.failNext("COMMIT")
        try? await withDBContext { try await primary.session().execute("INSERT") }
        let spans = tracer.finishedSpans.filter { $0.operationName == "transaction" }
        #expect(spans.map { $0.attributes.get("contextdb.transaction.outcome") } == [.string("rollback"), .string("commit_failed")])
        #expect(spans[1].status?.code == .error)
        #expect(spans[1].attributes.get("error.type") == .string("FakeError"), "the error's type, not its text")
        #expect(spans[1].errors.isEmpty, "no error text: it may quote a rejected value")
        #expect(tracer.activeSpans.isEmpty, "every span ended")
    }

    @Test func aSessionClosedWithItsTransactionOpenEndsTheSpanAsARollback() async throws {
        let primary = connect()
        let context = DBContext()
        try await context.run { try await primary.session().execute("INSERT") }
        #expect(tracer.activeSpans.count == 1)
        await context.end()
        #expect(tracer.activeSpans.isEmpty)
        #expect(transactions("rollback") == 1)
    }
}
