import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import Foundation
import Synchronization
import Testing
import TestSupport

/// The libpq engine against the test cluster, beyond the conformance suite both engines pass
/// (`EngineConformanceTests`): bound values and typed rows, a failed block that joined the
/// transaction, a statement timeout and a cancelled task seen on the server, a busy pool.
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(3)))
struct LibPQEngineTests {
    /// A connect of the test's own: `application_name` names its connections on the server.
    static func connect(
        _ label: String = "libpq", readOnly: Bool = false, maximumConnections: Int = 10,
        leaseTimeout: Duration = .seconds(30), statementTimeout: Duration? = nil, applicationName: String = "contextdb-libpq-test"
    ) throws -> DBConnect<LibPQEngine> {
        try running(DBConnect(
            label: label, conninfo: TestCluster.url(query: "sslmode=disable&application_name=\(applicationName)"),
            options: DBSessionOptions(readOnly: readOnly), maximumConnections: maximumConnections,
            leaseTimeout: leaseTimeout, statementTimeout: statementTimeout
        ))
    }

    /// A table of the test's own, dropped after `body`.
    static func withTable<R>(_ columns: String = "id serial PRIMARY KEY, text text NOT NULL", _ body: (DBConnect<LibPQEngine>, String) async throws -> R) async throws -> R {
        let primary = try connect()
        let table = "libpq_\(UInt64.random(in: 0...UInt64.max))"
        try await primary.withTransaction { try await $0.execute("CREATE TABLE \(unescaped: table) (\(unescaped: columns))") }
        do {
            let result = try await body(primary, table)
            try await primary.withTransaction { try await $0.execute("DROP TABLE \(unescaped: table)") }
            await primary.close()
            return result
        } catch {
            try? await primary.withTransaction { try await $0.execute("DROP TABLE \(unescaped: table)") }
            await primary.close()
            throw error
        }
    }

    static func count(_ connect: DBConnect<LibPQEngine>, _ table: String) async throws -> Int {
        try await connect.withSession { try await $0.queryValue("SELECT count(*) FROM \(unescaped: table)", as: Int.self) ?? -1 }
    }

    @Test func valuesAreBoundNeverSplicedAndDecodeByType() async throws {
        try await Self.withTable { primary, table in
            let hostile = "'); DROP TABLE \(table); --"
            let id = try await primary.withTransaction { session in
                try await session.queryValue("INSERT INTO \(unescaped: table) (text) VALUES (\(hostile)) RETURNING id", as: Int.self)
            }
            let row = try #require(try await primary.withSession { try await $0.query("SELECT id, text, NULL::int AS nothing, true FROM \(unescaped: table)").first })
            let (readID, text) = try row.decode((Int, String).self)
            #expect(readID == id && text == hostile)
            #expect(try row.decode(Int?.self, column: "nothing") == nil)
            #expect(try row.decode(Bool.self, column: 3))
            let error = #expect(throws: DBError.self) { try row.decode(Int.self, column: 1) }
            #expect(error?.message.contains("column 1 (text)") == true)
        }
    }

    @Test func aFailedBlockRollsBackTheTransactionItJoinedAndTheSessionGoesOn() async throws {
        try await Self.withTable("id int PRIMARY KEY, text text") { primary, table in
            try await withDBContext {
                try await primary.session().execute("INSERT INTO \(unescaped: table) VALUES (1, 'first')")
                let error = await expectDBError(.queryFailed) {
                    try await primary.atomic(.append) { session in
                        try await session.execute("INSERT INTO \(unescaped: table) VALUES (1, 'duplicate')")
                    }
                }
                #expect(error?.sqlState == "23505", "a unique violation, with its SQLSTATE")
                try await primary.session().execute("INSERT INTO \(unescaped: table) VALUES (2, 'second')")
            }
            let texts = try await primary.withSession { try await $0.query("SELECT text FROM \(unescaped: table)").map { try $0.decode(String.self) } }
            #expect(texts == ["second"])
        }
    }

    @Test func aStatementPastItsTimeoutIsCancelledOnTheServer() async throws {
        let name = "contextdb-libpq-timeout-\(UInt32.random(in: 0...UInt32.max))"
        let slow = try Self.connect(statementTimeout: .milliseconds(300), applicationName: name)
        let error = await expectDBError(.statementTimeout) {
            try await withDBContext { try await slow.session().execute("SELECT pg_sleep(30)") }
        }
        #expect(error?.message.contains("deadline") == true)
        try await eventually("no statement of it runs on the server") { try await Self.activeStatements(name) == 0 }
        // The connection was cancelled, not closed: it serves the next session.
        #expect(try await slow.withSession { try await $0.queryValue("SELECT 1", as: Int.self) } == 1)
        await slow.close()
    }

    @Test func aCancelledTaskCancelsItsStatement() async throws {
        let name = "contextdb-libpq-cancel-\(UInt32.random(in: 0...UInt32.max))"
        let primary = try Self.connect(applicationName: name)
        let task = Task { try await withDBContext { try await primary.session().execute("SELECT pg_sleep(30)") } }
        try await eventually("the statement runs") { try await Self.activeStatements(name) == 1 }
        task.cancel()
        let outcome = await task.result
        #expect(throws: CancellationError.self) { try outcome.get() }
        try await eventually("it no longer runs on the server") { try await Self.activeStatements(name) == 0 }
        #expect(primary.engines.values.allSatisfy { $0.leasedConnectionCount == 0 })
        await primary.close()
    }

    @Test func aLeaseOnABusyPoolFailsAtItsTimeoutWithAClearError() async throws {
        let primary = try Self.connect(maximumConnections: 1, leaseTimeout: .milliseconds(200))
        // The engine runs, and its connection is open (a 200 ms lease timeout also bounds the
        // wait for the engine's run() to start, which a loaded machine may exceed).
        try await eventually("the engine serves") {
            (try? await primary.withSession { try await $0.queryValue("SELECT 1", as: Int.self) }) == 1
        }
        try await withDBContext {
            _ = try await primary.session().queryValue("SELECT 1", as: Int.self)  // holds the only connection
            let error = await expectDBError(.connectionFailed) {
                try await withDBContext { _ = try await primary.session().queryValue("SELECT 1", as: Int.self) }
            }
            #expect(error?.message.contains("no connection became free") == true, "\(String(describing: error))")
        }
        // Once the released connection's reset is done (with a 200 ms lease timeout, a loaded
        // machine may need a few tries), the pool serves again.
        try await eventually("the pool serves again") {
            (try? await primary.withSession { try await $0.queryValue("SELECT 2", as: Int.self) }) == 2
        }
        await primary.close()
    }

    /// A COMMIT never sent (its connection was already lost) is a lost connection — the server
    /// rolled the transaction back — not an unknown outcome.
    @Test func aCommitOnALostConnectionIsNotAnUnknownOutcome() async throws {
        let engine = running(try LibPQEngine(conninfo: TestCluster.url(query: "sslmode=disable")))
        let connection = try await engine.leaseConnection()
        _ = try await engine.execute(.begin(DBSessionOptions()), on: connection)
        try await Self.admin { _ = try await $0.query("SELECT pg_terminate_backend(\(Int(connection.backendPID)))") }
        await #expect(throws: DBError.self) { _ = try await engine.execute(.savepoint("s"), on: connection) }
        #expect(!connection.isUsable)
        let error = await expectDBError(.connectionLost) { _ = try await engine.execute(.commit, on: connection) }
        #expect(error?.code != .commitOutcomeUnknown)
        await engine.releaseConnection(connection, reusable: false)
        await engine.shutdown()
    }

    @Test func aValueWithANulCharacterIsRefusedNotTruncated() async throws {
        let primary = try Self.connect()
        let error = await expectDBError(.queryFailed) {
            try await withDBContext { _ = try await primary.session().queryValue("SELECT \("admin\u{0}x")::text", as: String.self) }
        }
        #expect(error?.message.contains("NUL") == true)
        await primary.close()
    }

    @Test func connectionStringErrorsNeverShowThePassword() throws {
        let error = #expect(throws: DBError.self) { try LibPQConninfo("postgresql://app:s3cr3t-pw@[::1/shop") }
        #expect(error?.message.contains("s3cr3t-pw") == false, "\(String(describing: error))")
        // libpq quotes a bad percent-escape as it stands: here, inside the password.
        let escaped = #expect(throws: DBError.self) { try LibPQConninfo("postgresql://app:s3cr3t%ZZ@db1/shop") }
        #expect(escaped?.message.contains("s3cr3t") == false, "\(String(describing: escaped))")
        let parsed = try LibPQConninfo("host=db1 password=s3cr3t-pw sslpassword=k3y-pw")
        #expect(!parsed.description.contains("s3cr3t-pw") && !parsed.description.contains("k3y-pw"))
        let routed = #expect(throws: DBError.self) {
            try LibPQEngine(conninfo: "host=db1 hostaddr=10.0.0.1", endpoint: PostgresEndpoint(host: "db2"))
        }
        #expect(routed?.message.contains("hostaddr") == true)
    }

    /// How many statements of connections named `applicationName` run on the server.
    static func activeStatements(_ applicationName: String) async throws -> Int {
        try await admin { session in
            try await session.queryValue(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = \(applicationName) AND state = 'active'", as: Int.self
            ) ?? -1
        }
    }

    static func admin<R>(_ body: (DBSession<LibPQEngine>) async throws -> R) async throws -> R {
        let admin = try connect("admin", applicationName: "contextdb-libpq-admin")
        let result = try await admin.withSession(body)
        await admin.close()
        return result
    }
}
