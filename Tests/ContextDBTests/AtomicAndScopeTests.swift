import ContextDB
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1))) struct AtomicAndScopeTests {
    @Test(arguments: [DBAtomicMode.commit, .rollback, .append])
    func atomicWithoutAnOpenTransactionCommitsItsOwn(mode: DBAtomicMode) async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            try await connect.atomic(mode) { try await $0.execute("INSERT") }
            #expect(database.committedRows == 1)
        }
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: COMMIT"])
    }

    @Test func atomicModesWithAnOpenTransaction() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await connect.atomic(.commit) { try await $0.execute("INSERT") }
            #expect(database.committedRows == 2)
            try await session.execute("INSERT")
            try await connect.atomic(.rollback) { try await $0.execute("INSERT") }
            #expect(database.committedRows == 3)
            try await session.execute("INSERT")
            try await connect.atomic(.append) { try await $0.execute("INSERT") }
            #expect(database.committedRows == 5)
            try await session.execute("INSERT")
            await #expect(throws: FakeError.boom) {
                try await connect.atomic(.append) { session in
                    try await session.execute("INSERT")
                    throw FakeError.boom
                }
            }
            #expect(database.committedRows == 5)
            #expect(!session.isInTransaction)
            try await session.execute("INSERT")
            await expectDBError(.transactionAlreadyOpen) { try await connect.atomic(.fail) { _ in } }
            #expect(session.isInTransaction)
        }
        #expect(database.committedRows == 6)
    }

    @Test func atomicReturnsTheBodysValue() async throws {
        let connect = DBConnect.fake()
        let value = try await withDBContext { try await connect.atomic { _ in "done" } }
        #expect(value == "done")
    }

    @Test func withSessionIsOutsideTheContextAndRollsBackWhatIsNotCommitted() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let escaped = try await connect.withSession { session in
            try await session.execute("INSERT")
            return session
        }
        #expect(escaped.isClosed)
        #expect(database.committedRows == 0)
        try await connect.withSession { session in
            try await session.execute("INSERT")
            try await session.commit()
        }
        #expect(database.committedRows == 1)
        #expect(database.leasedCount == 0)
        try await withDBContext {
            let contextSession = try await connect.session()
            try await connect.withSession { #expect($0 !== contextSession) }
        }
    }

    @Test func withTransactionCommitsOrRollsBack() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await connect.withTransaction { try await $0.execute("INSERT") }
        await #expect(throws: FakeError.boom) {
            try await connect.withTransaction { session in
                try await session.execute("INSERT")
                throw FakeError.boom
            }
        }
        #expect(database.committedRows == 1)
        #expect(database.leasedCount == 0)
    }

    @Test func contextShortcutsNeedAContext() async throws {
        let connect = DBConnect.fake()
        await expectDBError(.noContext) { try await connect.commit() }
        await expectDBError(.noContext) { try await connect.rollback() }
        await expectDBError(.noContext) { try await connect.closeSession() }
        await expectDBError(.noContext) { try await connect.atomic { _ in } }
    }
}
