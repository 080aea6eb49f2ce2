import ContextDB
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1))) struct ConcurrencyTests {
    @Test func everyConcurrentContextGetsItsOwnSession() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let sessions = try await withThrowingTaskGroup(of: ObjectIdentifier.self) { group in
            for _ in 0..<1_000 {
                group.addTask {
                    try await withDBContext {
                        let session = try await connect.session()
                        try await session.execute("INSERT")
                        return ObjectIdentifier(session)
                    }
                }
            }
            return try await group.reduce(into: Set<ObjectIdentifier>()) { $0.insert($1) }
        }
        #expect(sessions.count == 1_000)
        #expect(database.committedRows == 1_000)
        #expect(database.leasedCount == 0)
    }

    @Test func childTasksShareTheParentsSession() async throws {
        let connect = DBConnect.fake()
        try await withDBContext {
            let parent = try await connect.session()
            async let fromAsyncLet = connect.session()
            let fromGroup = try await withThrowingTaskGroup(of: DBSession<FakeEngine>.self) { group in
                for _ in 0..<10 { group.addTask { try await connect.session() } }
                return try await group.reduce(into: [DBSession<FakeEngine>]()) { $0.append($1) }
            }
            let fromTask = try await Task { try await connect.session() }.value
            #expect(try await fromAsyncLet === parent)
            #expect(fromGroup.allSatisfy { $0 === parent })
            #expect(fromTask === parent)
        }
    }

    @Test func aSessionFirstAskedForInAChildIsSeenByTheParent() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let child = try await Task { try await connect.session() }.value
            try await child.execute("INSERT")
            #expect(try await connect.session() === child)
        }
        #expect(database.committedRows == 1)  // committed by the context's end
    }

    @Test func detachedTasksSeeNoContext() async throws {
        let connect = DBConnect.fake()
        try await withDBContext {
            _ = try await connect.session()
            let error = await Task.detached { () -> DBError? in
                #expect(DBContext.current == nil)
                do {
                    _ = try await connect.session()
                    return nil
                } catch { return error as? DBError }
            }.value
            #expect(error?.code == .noContext)
            #expect(error?.description.contains("Task.detached") == true)
        }
    }

    @Test func cancellingARequestRollsBackAndReleases() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let inserted = Signal()
        let request = Task {
            try await withDBContext {
                try await connect.session().execute("INSERT")
                inserted.fire()
                try await Task.sleep(for: .seconds(60))
            }
        }
        await inserted.wait()
        #expect(database.leasedCount == 1)
        request.cancel()
        await #expect(throws: CancellationError.self) { try await request.value }
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK", "release c1"])
    }

    @Test func cancellingManyRequestsLeaksNothing() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let requests = (0..<200).map { index in
            Task {
                try await withDBContext {
                    let session = try await connect.session()
                    try await session.execute("INSERT")
                    if index.isMultiple(of: 2) { try await session.commit() }
                    try await Task.sleep(for: .seconds(60))
                }
            }
        }
        try await eventually("every request inserted its row") { database.log.filter { $0.hasSuffix("INSERT") }.count == 200 }
        for request in requests { request.cancel() }
        for request in requests { _ = try? await request.value }
        #expect(database.leasedCount == 0)
        #expect(database.committedRows == 100)
    }
}
