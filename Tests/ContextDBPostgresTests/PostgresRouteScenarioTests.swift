import ContextDB
import ContextDBPostgres
import PostgresNIO
import Testing
import TestSupport

/// The nine routes of the Python original's example app at library level, against the real
/// primary, each through the middleware's lifecycle, counting committed rows afterwards.
@Suite(.enabled(if: TestCluster.isAvailable), .timeLimit(.minutes(2)))
struct PostgresRouteScenarioTests {
    /// Runs a handler like the middleware; a thrown error or failed commit becomes a 500.
    func serve(_ handler: () async throws -> Int) async -> Int {
        do { return try await withDBRequest(statusCode: { $0 }, handler) } catch { return 500 }
    }

    func scenario(status: Int, rows: Int, _ handler: (Fixture) async throws -> Int) async throws {
        try await Fixture.with { (fixture: Fixture) async throws in
            let got = await serve { try await handler(fixture) }
            #expect(got == status)
            #expect(try await fixture.count() == rows)
            try await fixture.expectAllIdle()
        }
    }

    @Test func simpleUsage() async throws {
        try await scenario(status: 200, rows: 1) { fixture in
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }

    @Test func atomicBaseExample() async throws {
        try await scenario(status: 200, rows: 2) { fixture in
            try await fixture.primary.atomic { try await fixture.insert($0) }
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }

    @Test func atomicAndPreviousTransaction() async throws {
        try await scenario(status: 500, rows: 5) { fixture in
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

    @Test func earlyCommit() async throws {
        try await scenario(status: 200, rows: 4) { fixture in
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

    @Test func concurrentQueries() async throws {
        try await scenario(status: 200, rows: 5) { fixture in
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

    @Test func earlyRollback() async throws {
        try await scenario(status: 200, rows: 0) { fixture in
            let session = try await fixture.primary.session()
            try await fixture.insert(session)
            try await fixture.primary.rollback()
            try await fixture.insert(session)
            try await session.rollback()
            return 200
        }
    }

    @Test func autoRollbackByException() async throws {
        try await scenario(status: 500, rows: 0) { fixture in
            try await fixture.insert(fixture.primary.session())
            throw CancellationError()
        }
    }

    @Test func autoRollbackByStatusCode() async throws {
        try await scenario(status: 500, rows: 0) { fixture in
            try await fixture.insert(fixture.primary.session())
            return 500
        }
    }

    @Test func earlyConnectionClose() async throws {
        try await scenario(status: 200, rows: 2) { fixture in
            try await fixture.primary.atomic { try await fixture.insert($0) }
            try await fixture.primary.closeSession()
            try await fixture.insert(fixture.primary.session())
            return 200
        }
    }
}
