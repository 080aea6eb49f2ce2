import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import ContextDBTesting
import Foundation
import Synchronization
import Testing
import TestSupport

/// What the conformance suite needs of a PostgreSQL engine module: a connect, and a way to run
/// SQL the suite writes itself (no input is ever spliced).
protocol ConformanceEngine: DatabaseEngine {
    static func connect(
        label: String, applicationName: String, readOnly: Bool, maximumConnections: Int, statementTimeout: Duration?
    ) throws -> DBConnect<Self>
    static func execute(_ sql: String, in session: DBSession<Self>) async throws
    static func int(_ sql: String, in session: DBSession<Self>) async throws -> Int?
    static func strings(_ sql: String, in session: DBSession<Self>) async throws -> [String]
    /// How many connections sessions hold now.
    var leasedConnectionCount: Int { get }
}

extension PostgresEngine: ConformanceEngine {
    static func connect(
        label: String, applicationName: String, readOnly: Bool, maximumConnections: Int, statementTimeout: Duration?
    ) throws -> DBConnect<PostgresEngine> {
        try DBConnect(
            label: label, url: TestCluster.url(query: "sslmode=disable&application_name=\(applicationName)"),
            options: DBSessionOptions(readOnly: readOnly), maximumConnections: maximumConnections, statementTimeout: statementTimeout
        )
    }
    static func execute(_ sql: String, in session: DBSession<PostgresEngine>) async throws {
        try await session.execute(PostgresQuery(unsafeSQL: sql))
    }
    static func int(_ sql: String, in session: DBSession<PostgresEngine>) async throws -> Int? {
        try await session.queryValue(PostgresQuery(unsafeSQL: sql), as: Int.self)
    }
    static func strings(_ sql: String, in session: DBSession<PostgresEngine>) async throws -> [String] {
        try await session.query(PostgresQuery(unsafeSQL: sql)).map { try $0.decode(String.self) }
    }
}

extension LibPQEngine: ConformanceEngine {
    static func connect(
        label: String, applicationName: String, readOnly: Bool, maximumConnections: Int, statementTimeout: Duration?
    ) throws -> DBConnect<LibPQEngine> {
        try DBConnect(
            label: label, conninfo: TestCluster.url(query: "sslmode=disable&application_name=\(applicationName)"),
            options: DBSessionOptions(readOnly: readOnly), maximumConnections: maximumConnections, statementTimeout: statementTimeout
        )
    }
    static func execute(_ sql: String, in session: DBSession<LibPQEngine>) async throws {
        try await session.execute(LibPQQuery(stringLiteral: sql))
    }
    static func int(_ sql: String, in session: DBSession<LibPQEngine>) async throws -> Int? {
        try await session.queryValue(LibPQQuery(stringLiteral: sql), as: Int.self)
    }
    static func strings(_ sql: String, in session: DBSession<LibPQEngine>) async throws -> [String] {
        try await session.query(LibPQQuery(stringLiteral: sql)).map { try $0.decode(String.self) }
    }
}

/// The engines the suite runs against.
enum EngineKind: String, CaseIterable, Sendable {
    case postgresNIO, libpq
    var type: any ConformanceEngine.Type {
        switch self {
        case .postgresNIO: PostgresEngine.self
        case .libpq: LibPQEngine.self
        }
    }
}

/// A table and a connect of one test, on one engine.
struct EngineFixture<Engine: ConformanceEngine>: Sendable {
    let primary: DBConnect<Engine>
    let table: String
    let applicationName: String

    static func with<R>(
        _: Engine.Type, readOnly: Bool = false, maximumConnections: Int = 10, statementTimeout: Duration? = nil,
        columns: String = "id serial PRIMARY KEY, text text NOT NULL",
        _ body: (EngineFixture) async throws -> R
    ) async throws -> R {
        let suffix = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let applicationName = "contextdb-conformance-\(suffix)"
        let fixture = EngineFixture(
            primary: try Engine.connect(
                label: "primary", applicationName: applicationName, readOnly: false,
                maximumConnections: maximumConnections, statementTimeout: statementTimeout
            ),
            table: "conformance_\(suffix)", applicationName: applicationName
        )
        return try await withRunningServices([fixture.primary]) {
            try await fixture.primary.withTransaction { try await Engine.execute("CREATE TABLE \(fixture.table) (\(columns))", in: $0) }
            do {
                let result = try await body(fixture)
                try? await fixture.primary.withTransaction { try await Engine.execute("DROP TABLE \(fixture.table)", in: $0) }
                await fixture.primary.close()
                return result
            } catch {
                try? await fixture.primary.withTransaction { try await Engine.execute("DROP TABLE \(fixture.table)", in: $0) }
                await fixture.primary.close()
                throw error
            }
        }
    }

    func insert(_ session: DBSession<Engine>, _ text: String = "example") async throws {
        try await Engine.execute("INSERT INTO \(table) (text) VALUES ('\(text)')", in: session)
    }

    func count() async throws -> Int {
        try await primary.withSession { try await Engine.int("SELECT count(*)::int FROM \(table)", in: $0) ?? -1 }
    }

    /// The states of this fixture's connections on the server, other than the asking one.
    func activity() async throws -> [String] {
        try await primary.withSession { session in
            try await Engine.strings(
                "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = '\(applicationName)' AND pid <> pg_backend_pid()",
                in: session
            )
        }
    }

    /// Waits until every connection of the fixture is idle (a release's reset runs briefly after it).
    func expectAllIdle(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try await eventually("every connection of the fixture is idle", timeout: .seconds(10), sourceLocation: sourceLocation) {
            try await activity().allSatisfy { $0 == "idle" }
        }
    }

    var leased: Int { primary.engines.values.map(\.leasedConnectionCount).reduce(0, +) }
}

/// One suite, both engines: the Python original's nine routes at library level (through the
/// middleware's lifecycle, counting committed rows after), read-only enforcement, a
/// deferred constraint's commit failure, savepoint recovery, a statement timeout, a connection
/// the server ended, and chaos that leaves nothing leased or in a transaction.
@Suite(.enabled(if: TestCluster.isAvailable), .timeLimit(.minutes(3)))
struct EngineConformanceTests {
    /// Runs a handler like the middleware; a thrown error or failed commit becomes a 500.
    static func serve(_ handler: () async throws -> Int) async -> Int {
        do { return try await withDBRequest(statusCode: { $0 }, handler) } catch { return 500 }
    }

    static func scenario<E: ConformanceEngine>(
        _ engine: E.Type, status: Int, rows: Int, _ handler: (EngineFixture<E>) async throws -> Int,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        try await EngineFixture.with(engine) { fixture in
            let got = await serve { try await handler(fixture) }
            #expect(got == status, sourceLocation: sourceLocation)
            #expect(try await fixture.count() == rows, sourceLocation: sourceLocation)
            #expect(fixture.leased == 0, sourceLocation: sourceLocation)
            try await fixture.expectAllIdle(sourceLocation: sourceLocation)
        }
    }

    // MARK: - The nine routes

    @Test(arguments: EngineKind.allCases) func simpleUsage(_ engine: EngineKind) async throws { try await Self.simpleUsage(engine.type) }
    static func simpleUsage<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 1) { fixture in
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func atomicBaseExample(_ engine: EngineKind) async throws { try await Self.atomicBaseExample(engine.type) }
    static func atomicBaseExample<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 2) { fixture in
            try await fixture.primary.atomic { try await fixture.insert($0) }
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func atomicAndPreviousTransaction(_ engine: EngineKind) async throws {
        try await Self.atomicAndPreviousTransaction(engine.type)
    }
    static func atomicAndPreviousTransaction<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 500, rows: 5) { fixture in
            let connect = fixture.primary
            let session = try await connect.session()
            try await fixture.insert(session)
            try await connect.atomic(.commit) { try await fixture.insert($0) }
            try await fixture.insert(session)
            try await connect.atomic(.rollback) { try await fixture.insert($0) }
            try await fixture.insert(session)
            try await connect.atomic(.append) { try await fixture.insert($0) }
            try await fixture.insert(session)
            do {
                try await connect.atomic(.append) { session in
                    try await fixture.insert(session)
                    throw CancellationError()
                }
            } catch is CancellationError {}
            try await fixture.insert(session)
            try await connect.atomic(.fail) { try await fixture.insert($0) }
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func earlyCommit(_ engine: EngineKind) async throws { try await Self.earlyCommit(engine.type) }
    static func earlyCommit<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 4) { fixture in
            let connect = fixture.primary
            let session = try await connect.session()
            try await fixture.insert(session)
            try await session.commit()
            try await fixture.insert(session)
            try await connect.commit()
            try await connect.closeSession()
            try await fixture.insert(connect.session())
            try await fixture.insert(connect.session())
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func concurrentQueries(_ engine: EngineKind) async throws { try await Self.concurrentQueries(engine.type) }
    static func concurrentQueries<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 5) { fixture in
            let connect = fixture.primary
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await fixture.insert(connect.session()) }
                group.addTask { try await withDBContext { try await fixture.insert(connect.session()) } }
                group.addTask {
                    try await withDBContext {
                        try await fixture.insert(connect.session())
                        try await connect.commit()
                        try await connect.closeSession()
                    }
                }
                group.addTask { try await connect.withTransaction { try await fixture.insert($0) } }
                group.addTask {
                    try await connect.withSession { session in
                        try await fixture.insert(session)
                        try await session.commit()
                    }
                }
                group.addTask {
                    try? await withDBContext {
                        try await fixture.insert(connect.session())
                        throw CancellationError()
                    }
                }
                try await group.waitForAll()
            }
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func earlyRollback(_ engine: EngineKind) async throws { try await Self.earlyRollback(engine.type) }
    static func earlyRollback<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 0) { fixture in
            let session = try await fixture.primary.session()
            try await fixture.insert(session)
            try await fixture.primary.rollback()
            try await fixture.insert(session)
            try await session.rollback()
            return 200
        }
    }

    @Test(arguments: EngineKind.allCases) func autoRollbackByException(_ engine: EngineKind) async throws {
        try await Self.autoRollbackByException(engine.type)
    }
    static func autoRollbackByException<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 500, rows: 0) { fixture in
            try await fixture.insert(fixture.primary.session())
            throw CancellationError()
        }
    }

    @Test(arguments: EngineKind.allCases) func autoRollbackByStatusCode(_ engine: EngineKind) async throws {
        try await Self.autoRollbackByStatusCode(engine.type)
    }
    static func autoRollbackByStatusCode<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 500, rows: 0) { fixture in
            try await fixture.insert(fixture.primary.session())
            return 500
        }
    }

    @Test(arguments: EngineKind.allCases) func earlyConnectionClose(_ engine: EngineKind) async throws {
        try await Self.earlyConnectionClose(engine.type)
    }
    static func earlyConnectionClose<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await scenario(engine, status: 200, rows: 2) { fixture in
            try await fixture.primary.atomic { try await fixture.insert($0) }
            try await fixture.primary.closeSession()
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }

    // MARK: - Faults and guarantees

    @Test(arguments: EngineKind.allCases) func aReadOnlyConnectRefusesWrites(_ engine: EngineKind) async throws {
        try await Self.aReadOnlyConnectRefusesWrites(engine.type)
    }
    static func aReadOnlyConnectRefusesWrites<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine) { fixture in
            let replica = try E.connect(
                label: "replica", applicationName: fixture.applicationName, readOnly: true, maximumConnections: 2, statementTimeout: nil
            )
            try await withRunningServices([replica]) {
                let error = await expectDBError(.readOnlySession) {
                    try await withDBContext { try await fixture.insert(replica.session()) }
                }
                #expect(error?.sqlState == "25006")
                #expect(error?.httpAnswer().status == 409)
            }
            #expect(try await fixture.count() == 0)
        }
    }

    @Test(arguments: EngineKind.allCases) func aDeferredConstraintFailsTheCommitAndNothingIsLeft(_ engine: EngineKind) async throws {
        try await Self.aDeferredConstraintFailsTheCommit(engine.type)
    }
    static func aDeferredConstraintFailsTheCommit<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine, columns: "text text, UNIQUE (text) DEFERRABLE INITIALLY DEFERRED") { fixture in
            let status = await serve {
                let session = try await fixture.primary.session()
                try await fixture.insert(session, "same")
                try await fixture.insert(session, "same")  // checked at COMMIT
                return 200
            }
            #expect(status == 500, "a failed commit is never a 200")
            #expect(try await fixture.count() == 0)
            try await fixture.expectAllIdle()
        }
    }

    @Test(arguments: EngineKind.allCases) func aTransactionRecoveredWithASavepointCommitsBothRows(_ engine: EngineKind) async throws {
        try await Self.savepointRecovery(engine.type)
    }
    static func savepointRecovery<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine) { fixture in
            try await withDBContext {
                let session = try await fixture.primary.session()
                try await fixture.insert(session, "a")
                try await E.execute("SAVEPOINT s", in: session)
                await expectDBError(.queryFailed) { try await E.execute("SELECT 1 / 0", in: session) }
                try await E.execute("ROLLBACK TO SAVEPOINT s", in: session)
                try await fixture.insert(session, "b")
            }
            #expect(try await fixture.count() == 2)
            // Without the savepoint, a swallowed failure still fails the commit.
            let error = await expectDBError(.commitFailed) {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    try await fixture.insert(session, "c")
                    try? await E.execute("SELECT 1 / 0", in: session)
                }
            }
            #expect(error?.message.contains("rolled the transaction back") == true)
            #expect(try await fixture.count() == 2)
        }
    }

    @Test(arguments: EngineKind.allCases) func aStatementPastItsTimeoutFailsAndTheConnectionServesAgain(_ engine: EngineKind) async throws {
        try await Self.aStatementPastItsTimeout(engine.type)
    }
    static func aStatementPastItsTimeout<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine, statementTimeout: .milliseconds(300)) { fixture in
            await expectDBError(.statementTimeout) {
                try await withDBContext { try await E.execute("SELECT pg_sleep(30)", in: fixture.primary.session()) }
            }
            #expect(try await fixture.primary.withSession { try await E.int("SELECT 1", in: $0) } == 1)
            try await fixture.expectAllIdle()
        }
    }

    @Test(arguments: EngineKind.allCases) func aConnectionTheServerEndedFailsAndTheNextSessionWorks(_ engine: EngineKind) async throws {
        try await Self.aConnectionTheServerEnded(engine.type)
    }
    static func aConnectionTheServerEnded<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine) { fixture in
            await expectDBError(.connectionLost) {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    let pid = try #require(try await E.int("SELECT pg_backend_pid()", in: session))
                    _ = try await fixture.primary.withSession { try await E.int("SELECT pg_terminate_backend(\(pid))::int", in: $0) }
                    try await fixture.insert(session)
                }
            }
            try await fixture.primary.withTransaction { try await fixture.insert($0) }
            #expect(try await fixture.count() == 1)
            #expect(fixture.leased == 0)
        }
    }

    @Test(arguments: EngineKind.allCases) func chaosLeavesNothingLeasedOrInATransaction(_ engine: EngineKind) async throws {
        try await Self.chaos(engine.type)
    }
    private struct Thrown: Error {}

    static func chaos<E: ConformanceEngine>(_ engine: E.Type) async throws {
        try await EngineFixture.with(engine, maximumConnections: 6) { fixture in
            await withTaskGroup(of: Void.self) { group in
                for index in 0..<300 {
                    group.addTask {
                        let work = Task {
                            try await withDBContext {
                                let session = try await fixture.primary.session()
                                try await fixture.insert(session, "row \(index)")
                                _ = try await E.int("SELECT 1 FROM pg_sleep(0.002)", in: session)
                                if index % 3 == 1 { throw Thrown() }
                            }
                        }
                        if index % 5 == 2 { work.cancel() }
                        _ = await work.result
                    }
                }
            }
            #expect(fixture.leased == 0)
            try await fixture.expectAllIdle()
            #expect(try await fixture.count() <= 200, "no thrown context committed")
        }
    }
}
