import ContextDB
import ContextDBPostgres
import PostgresNIO
import Testing
import TestSupport

/// Faults of the issue "A request never hangs…", against the real primary: connections the
/// server ends, session state left on pooled connections, savepoint recovery, statement deadlines.
/// The suite's time limit is the hang detector: before the fixes these tests never returned.
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(2)))
struct ServerFaultTests {
    /// The backend process ID of the session's connection.
    private func backendPID(_ session: DBSession<PostgresEngine>) async throws -> Int32 {
        try await session.queryValue("SELECT pg_backend_pid()", as: Int32.self)!
    }

    /// The state of a backend in `pg_stat_activity` (`active`, `idle in transaction`, …), read
    /// from another connection; `nil` once the backend is gone.
    private func backendState(_ pid: Int32, through connect: DBConnect<PostgresEngine>) async throws -> String? {
        try await connect.withSession { session in
            try await session.query("SELECT coalesce(state, '') || ':' || query FROM pg_stat_activity WHERE pid = \(pid)")
                .first?.decode(String.self)
        }
    }

    /// Ends a backend from another connection, and waits until it is gone.
    private func terminate(_ pid: Int32, through connect: DBConnect<PostgresEngine>) async throws {
        try await connect.withSession { session in
            _ = try await session.queryValue("SELECT pg_terminate_backend(\(pid), 5000)", as: Bool.self)
        }
    }

    /// The server ends the connection around the moment a statement is prepared (an idle
    /// transaction timeout of 1 ms races each statement): every transaction still ends, with
    /// its rows or with a typed error — none waits forever. Each statement is new to the
    /// connection, so each is prepared.
    @Test func aConnectionEndedWhileAStatementIsPreparedNeverHangsTheSession() async throws {
        let connect = try DBConnect(url: TestCluster.primaryURL, maximumConnections: 1)
        try await using(connect) {
            var outcomes: [DBError.Code?] = []
            for round in 0..<300 {
                do {
                    try await connect.withTransaction { session in
                        try await session.execute("SET LOCAL idle_in_transaction_session_timeout = '1ms'", prepared: false)
                        if round % 3 == 0 { try await Task.sleep(for: .microseconds(Int.random(in: 0...1_500))) }
                        _ = try await session.query("SELECT \(round)::int + \(unescaped: String(round)) AS prepared_race")
                    }
                    outcomes.append(nil)
                } catch let error as DBError {
                    outcomes.append(error.code)
                }
            }
            let expected: Set<DBError.Code?> = [nil, .connectionLost, .commitFailed, .commitOutcomeUnknown]
            #expect(Set(outcomes).isSubset(of: expected), "\(Set(outcomes))")
            #expect(outcomes.contains(.connectionLost), "the server did end connections mid-transaction")
        }
    }

    @Test(arguments: ["SELECT 1", "COMMIT"])
    func aStatementOnABackendTheServerTerminatedFailsAndTheConnectStillWorks(next: String) async throws {
        try await Fixture.with(maximumConnections: 2) { (fixture: Fixture) async throws in
            var thrown: DBError?
            do {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    try await fixture.insert(session, "lost")
                    try await terminate(try await backendPID(session), through: fixture.primary)
                    if next == "SELECT 1" {
                        let lost = await expectDBError(.connectionLost) { try await session.execute("SELECT 1") }
                        #expect(lost?.host == "\(TestCluster.host):\(TestCluster.port)")
                        #expect(lost?.connect == "primary")
                        #expect(lost?.message.contains("closed the connection") == true)
                    }
                }  // the end-of-request COMMIT
                Issue.record("the transaction of a terminated backend committed")
            } catch let error as DBError {
                thrown = error
            }
            // When the client saw the close before sending COMMIT: commitFailed. When the close
            // was still under way as COMMIT went out, the driver cannot tell whether it was sent,
            // so the honest answer is commitOutcomeUnknown (here it did not commit: the count).
            #expect(thrown?.code == .commitFailed || thrown?.code == .commitOutcomeUnknown, "\(String(describing: thrown))")
            #expect(thrown?.message.contains("lost") == true || thrown?.message.contains("closed") == true)
            #expect(try await fixture.count() == 0)
            #expect(fixture.primary.engines.values.allSatisfy { $0.leasedConnectionCount == 0 })
            // The next request on the same connect works.
            try await withDBContext { try await fixture.insert(fixture.primary.session(), "next") }
            #expect(try await fixture.count() == 1)
        }
    }

    @Test func anIdleInTransactionTimeoutEndsTheTransactionWithAClearError() async throws {
        try await Fixture.with(maximumConnections: 2) { (fixture: Fixture) async throws in
            await expectDBError(.commitFailed) {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    try await fixture.insert(session, "timed out")
                    let pid = try await backendPID(session)
                    // Armed when the backend next goes idle: right after this statement.
                    try await session.execute("SET idle_in_transaction_session_timeout = '50ms'")
                    try await eventually("the server ends the backend (25P03)") {
                        try await backendState(pid, through: fixture.primary) == nil
                    }
                    await expectDBError(.connectionLost) { try await session.execute("SELECT 1") }
                }
            }
            #expect(try await fixture.count() == 0)
            try await withDBContext { try await fixture.insert(fixture.primary.session(), "next") }
            #expect(try await fixture.count() == 1)
        }
    }

    @Test func aBackendTerminatedWhileAStatementRunsFailsWithTheServersReason() async throws {
        try await Fixture.with(maximumConnections: 2) { (fixture: Fixture) async throws in
            try await withDBContext {
                let session = try await fixture.primary.session()
                let pid = try await backendPID(session)
                async let killed: Void = {
                    try await eventually("the statement runs") {
                        try await backendState(pid, through: fixture.primary)?.hasPrefix("active:SELECT pg_sleep") == true
                    }
                    try await terminate(pid, through: fixture.primary)
                }()
                let lost = await expectDBError(.connectionLost) { try await session.execute("SELECT pg_sleep(30)") }
                try await killed
                #expect(lost?.message.contains("57P01") == true)
                try await session.rollback()  // forgets the lost transaction
                #expect(try await session.queryValue("SELECT 1", as: Int.self) == 1)
            }
        }
    }

    @Test func aStatementRightAfterTheConnectionClosesFailsInsteadOfWaiting() async throws {
        let engine = try running(PostgresEngine(url: PostgresURL(TestCluster.primaryURL), maximumConnections: 2))
        for _ in 0..<20 {
            let connection = try await engine.leaseConnection()
            let closing: EventLoopFuture<Void> = connection.close()  // from off the event loop, not awaited
            let error = await expectDBError(.connectionLost) {
                _ = try await engine.query("SELECT 1", on: connection, logger: engine.logger)
            }
            #expect(error?.host == engine.endpoint.description)
            #expect(!engine.isConnectionUsable(connection))
            try? await closing.get()
            await engine.releaseConnection(connection, reusable: false)
        }
        #expect(engine.leasedConnectionCount == 0)
        await engine.shutdown()
    }

    @Test func theNextBorrowerGetsACleanSession() async throws {
        let connect = try DBConnect(url: TestCluster.primaryURL, maximumConnections: 1)
        try await using(connect) {
        let first = try await withDBContext {
            let session = try await connect.session()
            try await session.execute("SET statement_timeout = '4321ms'")
            try await session.execute("SET application_name = 'x'")
            _ = try await session.query("SELECT pg_advisory_lock(42)")
            try await session.execute("CREATE TEMP TABLE contextdb_reset_probe (i int)")
            try await session.execute("LISTEN contextdb_reset_channel")
            try await session.execute("DECLARE contextdb_cursor CURSOR WITH HOLD FOR SELECT 1")
            return try await backendPID(session)
        }
        let (second, state) = try await withDBContext {
            let session = try await connect.session()
            return (
                try await backendPID(session),
                try await session.queryFirst("""
                    SELECT current_setting('statement_timeout'), current_setting('application_name'),
                           (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                           to_regclass('pg_temp.contextdb_reset_probe') IS NULL,
                           (SELECT count(*)::int FROM pg_listening_channels()),
                           (SELECT count(*)::int FROM pg_cursors WHERE name = 'contextdb_cursor')
                    """)!.decode((String, String, Int, Bool, Int, Int).self)
            )
        }
        #expect(second == first, "a pool of one hands the same backend on")
        #expect(state.0 == "0")
        #expect(state.1 != "x")
        #expect(state.2 == 0, "advisory locks released")
        #expect(state.3, "temporary table dropped")
        #expect(state.4 == 0, "LISTEN channels closed")
        #expect(state.5 == 0, "cursors closed")
        }
    }

    @Test func theResetCanBeTurnedOff() async throws {
        let connect = try DBConnect(url: TestCluster.primaryURL, maximumConnections: 1, resetsSessionState: false)
        try await using(connect) {
            try await withDBContext { try await connect.session().execute("SET statement_timeout = '4321ms'") }
            let timeout = try await withDBContext {
                try await connect.session().queryValue("SHOW statement_timeout", as: String.self)
            }
            #expect(timeout == "4321ms")
        }
    }

    @Test func aSwallowedFailureStillFailsTheCommit() async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            let error = await expectDBError(.commitFailed) {
                try await withDBContext {
                    let session = try await fixture.primary.session()
                    try await fixture.insert(session, "a")
                    try? await session.execute("SELECT 1 / 0")
                }
            }
            #expect(error?.message.contains("rolled the transaction back") == true)
            await expectDBError(.commitFailed) {
                try await withDBContext {
                    try await fixture.primary.atomic { session in
                        try await fixture.insert(session, "b")
                        try? await session.execute("SELECT 1 / 0")
                    }
                }
            }
            #expect(try await fixture.count() == 0)
            try await fixture.expectAllIdle()
        }
    }

    @Test func aConnectDeclaredWithAClientConfigurationCancelsAStatementPastTheTimeout() async throws {
        var configuration = PostgresClient.Configuration(
            host: TestCluster.host, port: TestCluster.port, username: TestCluster.user,
            password: TestCluster.password, database: TestCluster.database, tls: .disable
        )
        configuration.options.maximumConnections = 2
        let connect = DBConnect(configuration: configuration, statementTimeout: .milliseconds(300))
        try await using(connect) {
            try await withDBContext {
                let session = try await connect.session()
                let error = await expectDBError(.statementTimeout) { try await session.execute("SELECT pg_sleep(20)") }
                #expect(error?.sqlState == "57014", "cancelled by the server, the connection kept")
                try await session.rollback()
                #expect(try await session.queryValue("SELECT 1", as: Int.self) == 1)
            }
        }
    }

    @Test func aStatementPastTheStatementTimeoutIsCancelled() async throws {
        let connect = try DBConnect(url: TestCluster.primaryURL, maximumConnections: 2, statementTimeout: .milliseconds(300))
        try await using(connect) {
        try await withDBContext {
            let session = try await connect.session()
            let error = await expectDBError(.statementTimeout) { try await session.execute("SELECT pg_sleep(20)") }
            #expect(error?.sqlState == "57014")
            try await session.rollback()
            #expect(try await session.queryValue("SELECT 1", as: Int.self) == 1)  // the connection still serves
        }
        }
    }
}
