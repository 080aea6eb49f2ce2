import ContextDB
import ContextDBPostgres
import PostgresNIO
import InMemoryTracing
import MetricsTestKit
import Testing
import TestSupport
import Tracing

@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(3)))
struct PostgresEngineTests {
    @Test func theReplicaSeesReplicatedRowsOnceItReplayedThem() async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            try await withDBContext { try await fixture.insert(fixture.primary.session(), "replicated") }
            try await fixture.waitForReplica()
            let text = try await withDBContext {
                try await fixture.replica.session().queryValue(
                    "SELECT text FROM \(unescaped: fixture.table)", as: String.self
                )
            }
            #expect(text == "replicated")
        }
    }

    @Test func aWriteInAReadOnlySessionFailsAtOnce() async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            try await fixture.waitForReplica()  // the table exists on the replica
            let onReplica = await expectDBError(.readOnlySession) {
                try await withDBContext { try await fixture.insert(fixture.replica.session()) }
            }
            #expect(onReplica?.connect == "replica")
            #expect(onReplica?.sqlState == "25006")
            #expect(onReplica?.description.contains("read-only") == true)

            // The same rule on the primary's server, for a connect declared read-only.
            let readOnlyPrimary = try running(DBConnect(
                label: "reporting", url: TestCluster.primaryURL, options: DBSessionOptions(readOnly: true)
            ))
            await expectDBError(.readOnlySession) {
                try await withDBContext { try await fixture.insert(readOnlyPrimary.session()) }
            }
            await readOnlyPrimary.close()
            #expect(try await fixture.count() == 0)
        }
    }

    @Test func interpolatedValuesAreBoundNotSpliced() async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            let hostile = "x'); DROP TABLE \(fixture.table); --"
            try await withDBContext { try await fixture.insert(fixture.primary.session(), hostile) }
            let stored = try await fixture.primary.withSession { session in
                try await session.queryValue("SELECT text FROM \(unescaped: fixture.table)", as: String.self)
            }
            #expect(stored == hostile)
        }
    }

    @Test func aCommitThatFailsAtCommitTimeSavesNothing() async throws {
        try await Fixture.with(deferredUnique: true) { (fixture: Fixture) async throws in
            let error = await expectDBError(.commitFailed) {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    try await fixture.insert(session, "same")
                    try await fixture.insert(session, "same")  // the deferred check runs at COMMIT
                }
            }
            #expect(error?.host == "\(TestCluster.host):\(TestCluster.port)")
            #expect(try await fixture.count() == 0)
            try await fixture.expectAllIdle()
        }
    }

    @Test func sessionOptionsReachTheServer() async throws {
        let connect = try running(DBConnect(
            url: TestCluster.primaryURL, options: DBSessionOptions(readOnly: true, isolationLevel: .serializable)
        ))
        let (isolation, readOnly) = try await withDBContext {
            let session = try await connect.session()
            return (
                try await session.queryValue("SHOW transaction_isolation", as: String.self),
                try await session.queryValue("SHOW transaction_read_only", as: String.self)
            )
        }
        await connect.close()
        #expect(isolation == "serializable")
        #expect(readOnly == "on")
    }

    @Test func servedByIsTheHostTheSessionReallyUsed() async throws {
        let connect = try running(DBConnect(url: TestCluster.url(host: "127.0.0.1", port: TestCluster.replicaPort)))
        let port = try await withDBContext {
            try await connect.session().queryValue("SELECT inet_server_port()", as: Int.self)
        }
        await connect.close()
        #expect(port == TestCluster.replicaPort)
    }

    /// Both initializers offer read-your-own-writes: a write committed through a connect made
    /// from PostgresNIO's configuration records its WAL position in the request context.
    @Test func aConfigurationConnectRecordsTheCommitPositionForReadYourWrites() async throws {
        var configuration = PostgresClient.Configuration(
            host: TestCluster.host, port: TestCluster.port, username: TestCluster.user,
            password: TestCluster.password, database: TestCluster.database, tls: .disable
        )
        configuration.options.maximumConnections = 2
        let connect = running(DBConnect(configuration: configuration, readYourWrites: true))
        let token = try await withDBContext {
            try await connect.session().execute("CREATE TEMPORARY TABLE written (id int)")
            try await connect.session().execute("INSERT INTO written VALUES (1)")
            try await connect.commit()
            return DBContext.current?.consistencyToken
        }
        await connect.close()
        #expect(token.flatMap(PostgresLSN.init) != nil, "a WAL position: \(token ?? "none")")
    }

    /// The pool's gauges and the statements' timers, with the serving host's dimensions.
    @Test func statementsAndThePoolAreMeasured() async throws {
        let metrics = TestMetrics()
        let connect = try running(DBConnect(
            label: "measured", url: TestCluster.primaryURL, instrumentation: DBInstrumentation(metricsFactory: metrics)
        ))
        let dimensions = [
            ("db.system.name", "postgresql"), ("db.client.connection.pool.name", "measured"),
            ("server.address", TestCluster.host), ("server.port", "\(TestCluster.port)"),
        ]
        await expectDBError(.commitFailed) {  // the failed statement aborted the transaction
            try await withDBContext {
                let session = try await connect.session()
                _ = try await session.queryValue("SELECT 1", as: Int.self)
                let used = try metrics.expectGauge(DBMetricName.connectionCount, dimensions + [("db.client.connection.state", "used")])
                #expect(used.lastValue == 1, "one connection leased")
                await #expect(throws: DBError.self) { try await session.execute("SELECT no_such_column") }
            }
        }
        #expect(try metrics.expectTimer(DBMetricName.operationDuration, dimensions + [("db.operation.name", "SELECT")]).values.count == 1)
        #expect(try metrics.expectTimer(
            DBMetricName.operationDuration, dimensions + [("db.operation.name", "SELECT"), ("error.type", "queryFailed")]
        ).values.count == 1)
        #expect(metrics.counterTotal(label: DBMetricName.transactions, dimensions: dimensions + [("contextdb.transaction.outcome", "commit_failed")]) == 1)
        try await eventually("the released connection is idle again") {
            (try? metrics.expectGauge(DBMetricName.connectionCount, dimensions + [("db.client.connection.state", "idle")]).lastValue) == 1
        }
        await connect.close()
    }

    /// Statement spans, opted in: named by the operation, under the transaction's span, with the
    /// SQL text only when asked for and the bound values never.
    @Test func statementSpansCarryTheOperationAndNeverABoundValue() async throws {
        let tracer = InMemoryTracer()
        let secret = "s3cret-value-\(UInt32.random(in: 0...UInt32.max))"
        for recordsText in [false, true] {
            let connect = try running(DBConnect(
                url: TestCluster.primaryURL,
                instrumentation: DBInstrumentation(tracer: tracer, tracesStatements: true, recordsStatementText: recordsText)
            ))
            try await withDBContext {
                _ = try await connect.session().queryValue("SELECT length(\(secret))", as: Int.self)
            }
            await connect.close()
        }
        let statements = tracer.finishedSpans.filter { $0.operationName == "SELECT" }
        let transactions = tracer.finishedSpans.filter { $0.operationName == "transaction" }
        #expect(statements.count == 2 && transactions.count == 2)
        for (statement, transaction) in zip(statements, transactions) {
            #expect(statement.parentSpanID == transaction.spanID, "a statement is a child of its transaction")
            #expect(statement.attributes.get("db.operation.name") == .string("SELECT"))
            #expect(statement.attributes.get("db.namespace") == .string(TestCluster.database))
        }
        #expect(statements[0].attributes.get("db.query.text") == nil, "no text unless asked for")
        #expect(statements[1].attributes.get("db.query.text") == .string("SELECT length($1)"))
        // A statement the server rejects, quoting the bound value in its message.
        let failing = try running(DBConnect(
            url: TestCluster.primaryURL, instrumentation: DBInstrumentation(tracer: tracer, tracesStatements: true)
        ))
        await expectDBError(.commitFailed) {
            try await withDBContext {
                _ = await #expect(throws: DBError.self) { try await failing.session().execute("SELECT \(secret)::int") }
            }
        }
        await failing.close()
        let rejected = try #require(tracer.finishedSpans.last { $0.operationName == "SELECT" })
        #expect(rejected.attributes.get("error.type") == .string("queryFailed"))
        #expect(rejected.status?.code == .error)
        for span in tracer.finishedSpans {
            span.attributes.forEach { name, value in
                #expect(!"\(value)".contains(secret), "\(span.operationName): \(name) holds a bound value")
            }
            #expect(span.errors.allSatisfy { !"\($0.error)".contains(secret) }, "\(span.operationName): an error holds a bound value")
        }
    }
}
