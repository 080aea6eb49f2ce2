import ContextDB
import ContextDBPostgres
import PostgresNIO
import Synchronization
import Testing
import TestSupport

@Suite(.enabled(if: TestCluster.isAvailable), .timeLimit(.minutes(5)))
struct PostgresLeakTests {
    enum Chaos: Error { case thrown }

    /// A released connection is reset and serves the next lease: one connection for a pool of
    /// one, however many sessions run one after the other.
    @Test func aReleasedConnectionServesTheNextLease() async throws {
        try await Fixture.with(maximumConnections: 1) { (fixture: Fixture) async throws in
            let backend: @Sendable (DBSession<PostgresEngine>) async throws -> Int? = {
                try await $0.queryValue("SELECT pg_backend_pid()", as: Int.self)
            }
            let first = try await fixture.primary.withSession(backend)
            let second = try await fixture.primary.withSession(backend)
            #expect(first != nil && first == second, "the next lease took the same, clean connection")
            let engine = try #require(fixture.primary.engines.values.first)
            #expect(engine.leasedConnectionCount == 0)
            #expect(engine.openConnectionCount == 1)
        }
    }

    @Test func twoThousandChaoticSessionsLeakNothing() async throws {
        let maximumConnections = 10
        try await Fixture.with(maximumConnections: maximumConnections) { (fixture: Fixture) async throws in
            let committed = Counter()
            try await withThrowingTaskGroup(of: Void.self) { group in
                var running: [Task<Void, any Error>] = []
                for index in 0..<2_000 {
                    let task = Task {
                        try await withDBContext {
                            let session = try await fixture.primary.session()
                            try await fixture.insert(session, "row \(index)")
                            switch index % 6 {
                            case 0: throw Chaos.thrown
                            case 1: try await session.rollback()
                            case 2: await session.close()
                            case 3: try await Task.sleep(for: .milliseconds(Int.random(in: 0...20)))  // cancelled below
                            case 4: try await session.execute("SELECT pg_sleep(0.01)")
                            default: break
                            }
                        }
                        // Rolled back (1) and closed (2) sessions leave no row.
                        if ![1, 2].contains(index % 6) { committed.increment() }
                    }
                    running.append(task)
                    if index % 6 == 3, Bool.random() { task.cancel() }
                    if running.count == 64 {
                        for task in running { _ = try? await task.value }
                        running.removeAll()
                    }
                }
                for task in running { _ = try? await task.value }
                group.addTask {}
                try await group.waitForAll()
            }
            let activity = try await fixture.activity()
            #expect(!activity.contains { $0.hasPrefix("idle in transaction") }, "\(activity)")
            #expect(activity.filter { $0 != "" }.count <= maximumConnections)
            #expect(try await fixture.count() == committed.value)
        }
    }

    @Test func aCancelledTransactionNeverReachesTheNextBorrower() async throws {
        // One connection: the borrower after the cancellation must get the same one, clean.
        try await Fixture.with(maximumConnections: 1) { (fixture: Fixture) async throws in
            for _ in 0..<20 {
                let started = Signal()
                let request = Task {
                    try await withDBContext {
                        let session = try await fixture.primary.session()
                        try await fixture.insert(session, "uncommitted")
                        started.fire()
                        try await session.execute("SELECT pg_sleep(0.05)")
                        try await Task.sleep(for: .seconds(30))
                    }
                }
                await started.wait()
                request.cancel()
                _ = try? await request.value
                // Had the connection gone back inside the old transaction, this session's BEGIN
                // would join it and count the uncommitted row.
                let clean = try await fixture.primary.withSession { session in
                    try await session.queryValue(
                        "SELECT count(*)::int FROM \(unescaped: fixture.table)", as: Int.self
                    )
                }
                #expect(clean == 0)
            }
            try await fixture.expectAllIdle()
        }
    }

    /// Draining an engine (a demoted primary's, a host that left the cluster) waits for its
    /// sessions only up to its bound; then the connections still held are closed — their
    /// transactions roll back — and the session holding one learns it lost it.
    @Test func aDrainEndsAtItsBoundAndClosesWhatSessionsStillHold() async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            try await withDBContext {
                let session = try await fixture.primary.session()
                try await session.execute("SELECT 1")  // holds a connection, in a transaction
                let engine = try #require(fixture.primary.engines.values.first)
                #expect(engine.leasedConnectionCount == 1)
                await engine.drainAndShutdown(within: .milliseconds(200))  // returns: it does not wait for the session
                #expect(engine.openConnectionCount == 0)
                await expectDBError(.connectionLost) { try await session.execute("SELECT 1") }
                try await session.rollback()  // forgets the lost transaction
            }
        }
    }
}
