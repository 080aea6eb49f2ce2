import ContextDB
import Synchronization
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1))) struct DBContextTests {
    @Test func withoutAContextSessionIsAClearError() async throws {
        #expect(DBContext.current == nil)
        let error = await expectDBError(.noContext) { _ = try await DBConnect.fake().session() }
        #expect(error?.description.contains("withDBContext") == true)
    }

    @Test func aContextIsActiveInsideAndGoneAfter() async throws {
        let connect = DBConnect.fake()
        let context = try await withDBContext { () -> DBContext? in
            let first = try await connect.session()
            let second = try await connect.session()
            #expect(first === second)
            return DBContext.current
        }
        #expect(context != nil)
        #expect(context?.isEnded == true)
        #expect(DBContext.current == nil)
    }

    @Test func newContextReturnsTheValueAndRethrows() async throws {
        #expect(try await withDBContext { 42 } == 42)
        await #expect(throws: FakeError.boom) { try await withDBContext { throw FakeError.boom } }
    }

    @Test func newContextCommitsOnSuccessAndRollsBackOnThrow() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: COMMIT", "release c1"])
        database.clearLog()
        await #expect(throws: FakeError.boom) {
            try await withDBContext {
                try await connect.session().execute("INSERT")
                throw FakeError.boom
            }
        }
        #expect(database.log == ["lease c2@db1", "c2: BEGIN", "c2: INSERT", "c2: ROLLBACK", "release c2"])
        #expect(database.committedRows == 1)
        #expect(database.leasedCount == 0)
    }

    @Test func nestedContextIsIsolatedAndLeavesTheOuterUntouched() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let outerContext = DBContext.current
            let outer = try await connect.session()
            try await outer.execute("INSERT")
            let inner = try await withDBContext {
                #expect(DBContext.current !== outerContext)
                let inner = try await connect.session()
                try await inner.execute("INSERT")
                return inner
            }
            #expect(inner !== outer)
            #expect(inner.isClosed)
            #expect(DBContext.current === outerContext)
            #expect(try await connect.session() === outer)
            #expect(outer.isInTransaction)
            #expect(database.committedRows == 1)  // the inner one only
        }
        #expect(database.committedRows == 2)
    }

    @Test func joinRunsInTheActiveContextAndFailRefusesIt() async throws {
        let connect = DBConnect.fake()
        try await withDBContext {
            let outer = try await connect.session()
            let joined = try await withDBContext(ifActive: .join) { try await connect.session() }
            #expect(joined === outer)
            #expect(!outer.isClosed)
            await expectDBError(.contextAlreadyActive) { try await withDBContext(ifActive: .fail) {} }
        }
        // Without an active context, .fail and .join open a new one.
        try await withDBContext(ifActive: .fail) { #expect(DBContext.current != nil) }
    }

    @Test func sessionsAreClosedWhenTheContextEnds() async throws {
        let connect = DBConnect.fake()
        var context: DBContext?
        let session = try await withDBContext {
            context = DBContext.current
            return try await connect.session()
        }
        #expect(session.isClosed)
        await expectDBError(.sessionClosed) { try await session.execute("INSERT") }
        await expectDBError(.contextFinished) { try await context?.run { _ = try await connect.session() } }
    }

    @Test func closeAllKeepsTheContextUsable() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let first = try await connect.session()
            try await first.execute("INSERT")
            await DBContext.current?.closeAll()
            #expect(first.isClosed)
            let second = try await connect.session()
            #expect(second !== first)
            try await second.execute("INSERT")
        }
        #expect(database.committedRows == 1)
        #expect(database.leasedCount == 0)
    }

    @Test func finishByStatusCommitsBelow400AndRollsBackAbove() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        for status in [200, 399, 400, 500] {
            let context = DBContext()
            try await context.run { try await connect.session().execute("INSERT") }
            try await context.finish(statusCode: status)
            await context.end()
        }
        #expect(database.committedRows == 2)
        #expect(database.statements.filter { $0.hasSuffix("ROLLBACK") }.count == 2)
    }

    // MARK: beforeCommit

    @Test func beforeCommitRunsBeforeCommitWithTheSession() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let seen = Box<ObjectIdentifier?>(nil)
        var session: DBSession<FakeEngine>?
        try await withDBContext(beforeCommit: { committing in
            database.record("beforeCommit")
            seen.value = ObjectIdentifier(committing)
        }) {
            session = try await connect.session()
            try await session?.execute("INSERT")
        }
        #expect(seen.value == ObjectIdentifier(session!))
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "beforeCommit", "c1: COMMIT"])
    }

    @Test func beforeCommitIsNotCalledOnRollbackOrWithoutATransaction() async throws {
        let calls = Counter()
        let connect = DBConnect.fake()
        let hook: @Sendable (any AnyDBSession) async throws -> Void = { _ in calls.increment() }
        await #expect(throws: FakeError.boom) {
            try await withDBContext(beforeCommit: hook) {
                try await connect.session().execute("INSERT")
                throw FakeError.boom
            }
        }
        try await withDBContext(beforeCommit: hook) { _ = try await connect.session() }
        try await withDBContext(beforeCommit: hook) {
            try await connect.session().execute("INSERT")
            try await connect.commit()
        }
        #expect(calls.value == 0)
    }

    @Test func aFailingBeforeCommitPreventsTheCommit() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        await #expect(throws: FakeError.boom) {
            try await withDBContext(beforeCommit: { _ in throw FakeError.boom }) {
                try await connect.session().execute("INSERT")
            }
        }
        #expect(database.committedRows == 0)
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: ROLLBACK"])
        #expect(database.leasedCount == 0)
    }

    @Test func valuesStoredInBeforeCommitReachOnCommitted() async throws {
        enum Token: DBContextKey { typealias Value = String }
        let connect = DBConnect.fake()
        for status in [200, 500] {
            let response = try await withDBRequest(
                beforeCommit: { _ in DBContext.current?[Token.self] = "lsn-1" },
                statusCode: { $0.status },
                onCommitted: { context, response in response.cookie = context[Token.self] }
            ) {
                try await connect.session().execute("INSERT")
                #expect(DBContext.current?[Token.self] == nil)
                return (status: status, cookie: String?.none)
            }
            #expect(response.cookie == (status == 200 ? "lsn-1" : nil))
        }
    }

    @Test func theConsistencyTokenUpdatesAtomically() async throws {
        let context = DBContext()
        await withTaskGroup(of: Void.self) { group in
            for value in 1...200 {
                group.addTask {
                    context.updateConsistencyToken { current in
                        String(max(Int(current ?? "0")!, value))
                    }
                }
            }
        }
        #expect(context.consistencyToken == "200")
    }

    @Test func aRequestWhoseCommitFailsIsNotReportedAsDone() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("COMMIT")
        let status = await serve {
            try await connect.session().execute("INSERT")
            return 200
        }
        #expect(status == 500)
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
    }

    @Test func aFailedCommitRollsBackTheOtherSessions() async throws {
        let database = FakeDatabase()
        let first = DBConnect.fake(label: "first", database: database)
        let second = DBConnect.fake(label: "second", host: "db2", database: database)
        database.failNext("COMMIT")
        let error = await expectDBError(.commitFailed) {
            try await withDBContext {
                try await first.session().execute("INSERT")
                try await second.session().execute("INSERT")
            }
        }
        #expect(error?.connect == "first")
        #expect(database.committedRows == 0)
        #expect(database.statements == [
            "c1: BEGIN", "c1: INSERT", "c2: BEGIN", "c2: INSERT",
            "c1: COMMIT", "c1: ROLLBACK", "c2: ROLLBACK",
        ])
        #expect(database.leasedCount == 0)
    }
}

/// A mutable box for values a `@Sendable` closure writes.
final class Box<Value: Sendable>: Sendable {
    private let storage: Mutex<Value>
    init(_ value: Value) { storage = Mutex(value) }
    var value: Value {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }
}
