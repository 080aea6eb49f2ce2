import ContextDB
import Testing
import TestSupport

/// The nine routes of the Python original's example app, replayed against the fake engine
/// through the middleware's lifecycle (`serve`), with the exact statements each one causes.
@Suite(.timeLimit(.minutes(1))) struct RouteScenarioTests {
    let database = FakeDatabase()
    let connect: DBConnect<FakeEngine>

    init() { connect = DBConnect.fake(database: database) }

    func expectDone(status: Int, rows: Int, got: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(got == status, sourceLocation: sourceLocation)
        #expect(database.committedRows == rows, sourceLocation: sourceLocation)
        #expect(database.leasedCount == 0, "a connection was left leased", sourceLocation: sourceLocation)
    }

    @Test func simpleUsage() async throws {
        let status = await serve {
            try await connect.session().execute("INSERT")
            return 200
        }
        expectDone(status: 200, rows: 1, got: status)
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: COMMIT", "release c1"])
    }

    @Test func atomicBaseExample() async throws {
        let status = await serve {
            try await connect.atomic { try await $0.execute("INSERT") }
            try await connect.session().execute("INSERT")
            return 200
        }
        expectDone(status: 200, rows: 2, got: status)
        #expect(database.statements == [
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT",
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT",
        ])
    }

    @Test func atomicAndPreviousTransaction() async throws {
        let status = await serve {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await connect.atomic(.commit) { try await $0.execute("INSERT") }
            try await session.execute("INSERT")
            try await connect.atomic(.rollback) { try await $0.execute("INSERT") }
            try await session.execute("INSERT")
            try await connect.atomic(.append) { try await $0.execute("INSERT") }
            try await session.execute("INSERT")
            do {
                try await connect.atomic(.append) { session in
                    try await session.execute("INSERT")
                    throw FakeError.boom
                }
            } catch FakeError.boom {}
            try await session.execute("INSERT")
            try await connect.atomic(.fail) { try await $0.execute("INSERT") }
            return 200
        }
        expectDone(status: 500, rows: 5, got: status)
        #expect(database.statements == [
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT",  // atomic(.commit) commits the open one
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT",  // ... then its own
            "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK",  // atomic(.rollback) drops the open one
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT",
            "c1: BEGIN", "c1: INSERT", "c1: INSERT", "c1: COMMIT",  // .append joins and commits both
            "c1: BEGIN", "c1: INSERT", "c1: INSERT", "c1: ROLLBACK",  // .append + throw rolls both back
            "c1: BEGIN", "c1: INSERT",  // .fail refuses; the middleware rolls back
            "c1: ROLLBACK",
        ])
    }

    @Test func earlyCommit() async throws {
        let status = await serve {
            let first = try await connect.session()
            try await first.execute("INSERT")
            try await first.commit()
            try await first.execute("INSERT")
            try await connect.commit()
            try await connect.closeSession()
            let second = try await connect.session()
            try await second.execute("INSERT")
            try await connect.session().execute("INSERT")
            return 200
        }
        expectDone(status: 200, rows: 4, got: status)
        #expect(database.log == [
            "lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: COMMIT",
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT", "release c1",
            "lease c2@db1", "c2: BEGIN", "c2: INSERT", "c2: INSERT", "c2: COMMIT", "release c2",
        ])
    }

    @Test func concurrentQueries() async throws {
        let status = await serve {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await connect.session().execute("INSERT") }
                group.addTask {
                    try await withDBContext { try await connect.session().execute("INSERT") }
                }
                group.addTask {
                    try await withDBContext {
                        try await connect.session().execute("INSERT")
                        try await connect.commit()
                        try await connect.closeSession()
                    }
                }
                group.addTask { try await connect.withTransaction { try await $0.execute("INSERT") } }
                group.addTask {
                    try await connect.withSession { session in
                        try await session.execute("INSERT")
                        try await session.commit()
                    }
                }
                group.addTask {
                    try? await withDBContext {
                        try await connect.session().execute("INSERT")
                        throw FakeError.boom
                    }
                }
                try await group.waitForAll()
            }
            return 200
        }
        expectDone(status: 200, rows: 5, got: status)
        #expect(database.log.filter { $0.hasPrefix("lease") }.count == 6)
        #expect(database.statements.filter { $0.hasSuffix("ROLLBACK") }.count == 1)
    }

    @Test func earlyRollback() async throws {
        let status = await serve {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await connect.rollback()
            try await session.execute("INSERT")
            try await session.rollback()
            return 200
        }
        expectDone(status: 200, rows: 0, got: status)
        #expect(database.statements == [
            "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK", "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK",
        ])
    }

    @Test func autoRollbackByException() async throws {
        let status = await serve {
            try await connect.session().execute("INSERT")
            throw FakeError.boom
        }
        expectDone(status: 500, rows: 0, got: status)
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: ROLLBACK"])
    }

    @Test func autoRollbackByStatusCode() async throws {
        let status = await serve {
            try await connect.session().execute("INSERT")
            return 500
        }
        expectDone(status: 500, rows: 0, got: status)
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: ROLLBACK"])
    }

    @Test func earlyConnectionClose() async throws {
        let status = await serve {
            try await connect.atomic { try await $0.execute("INSERT") }
            try await connect.closeSession()
            #expect(database.leasedCount == 0)  // the connection went back before the other work
            try await connect.session().execute("INSERT")
            return 200
        }
        expectDone(status: 200, rows: 2, got: status)
        #expect(database.log == [
            "lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: COMMIT", "release c1",
            "lease c2@db1", "c2: BEGIN", "c2: INSERT", "c2: COMMIT", "release c2",
        ])
    }
}
