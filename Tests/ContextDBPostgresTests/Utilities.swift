import ContextDB
import ContextDBPostgres
import ContextDBTesting
import Foundation
import PostgresNIO
import Testing
import TestSupport

/// A primary and a replica connect plus a table of the test's own (`example_<random>`), so
/// tests can run in parallel and count rows without seeing each other's.
struct Fixture {
    let primary: DBConnect<PostgresEngine>
    let replica: DBConnect<PostgresEngine>
    let table: String
    let applicationName: String

    /// Runs `body` with a fresh fixture; drops the table and closes the engines afterwards.
    static func with<R>(
        maximumConnections: Int = 20,
        deferredUnique: Bool = false,
        _ body: (Fixture) async throws -> R
    ) async throws -> R {
        let suffix = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let applicationName = "contextdb-test-\(suffix)"
        let query = "sslmode=disable&application_name=\(applicationName)&connect_timeout=5"
        let fixture = Fixture(
            primary: try DBConnect(
                label: "primary", url: TestCluster.url(query: query), maximumConnections: maximumConnections
            ),
            replica: try DBConnect(
                label: "replica", url: TestCluster.url(host: TestCluster.replicaHost, port: TestCluster.replicaPort, query: query),
                options: DBSessionOptions(readOnly: true), maximumConnections: maximumConnections
            ),
            table: "example_\(suffix)",
            applicationName: applicationName
        )
        let unique = deferredUnique ? ", CONSTRAINT \(fixture.table)_text_key UNIQUE (text) DEFERRABLE INITIALLY DEFERRED" : ""
        return try await withRunningServices([fixture.primary, fixture.replica]) {
            try await fixture.primary.withTransaction { session in
                try await session.execute(
                    "CREATE TABLE \(unescaped: fixture.table) (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), text text\(unescaped: unique))"
                )
            }
            do {
                let result = try await body(fixture)
                await fixture.tearDown()
                return result
            } catch {
                await fixture.tearDown()
                throw error
            }
        }
    }

    private func tearDown() async {
        try? await primary.withTransaction { try await $0.execute("DROP TABLE IF EXISTS \(unescaped: table)") }
        await primary.close()
        await replica.close()
    }

    /// Inserts one row through `session`.
    func insert(_ session: DBSession<PostgresEngine>, _ text: String = "example") async throws {
        try await session.execute("INSERT INTO \(unescaped: table) (text) VALUES (\(text))")
    }

    /// The committed rows, counted on the primary in a session of its own.
    func count() async throws -> Int {
        try await primary.withSession { session in
            try await session.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self) ?? -1
        }
    }

    /// Waits until the replica has replayed everything the primary has committed so far —
    /// by comparing LSNs, not by sleeping a guessed time.
    func waitForReplica(timeout: Duration = .seconds(30)) async throws {
        let target = try await primary.withSession { session in
            try await session.queryValue("SELECT pg_current_wal_lsn()::text", as: String.self)!
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let caughtUp = try await replica.withSession { session in
                try await session.queryValue(
                    "SELECT pg_last_wal_replay_lsn() >= \(target)::pg_lsn", as: Bool.self
                ) ?? false
            }
            if caughtUp { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("the replica did not replay up to \(target) within \(timeout)")
    }

    /// Waits (up to 10 s) until every connection of this fixture is idle: none in a transaction,
    /// none running — a released connection's session reset runs briefly after the release.
    func expectAllIdle(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try await eventually("every connection of the fixture is idle", timeout: .seconds(10), sourceLocation: sourceLocation) {
            try await activity().allSatisfy { $0 == "idle" }
        }
    }

    /// Connections of this fixture's application in the server's `pg_stat_activity`, by state.
    func activity(on connect: DBConnect<PostgresEngine>? = nil) async throws -> [String] {
        try await (connect ?? primary).withSession { session in
            try await session.query(
                "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = \(applicationName) AND pid <> pg_backend_pid()"
            ).map { try $0.decode(String.self) }
        }
    }
}

/// Runs `body` while `connects` run, and closes them afterwards, also when `body` throws.
func using<R>(_ connects: DBConnect<PostgresEngine>..., body: () async throws -> R) async throws -> R {
    try await withRunningServices(connects) {
        do {
            let result = try await body()
            for connect in connects { await connect.close() }
            return result
        } catch {
            for connect in connects { await connect.close() }
            throw error
        }
    }
}
