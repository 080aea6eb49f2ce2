import ContextDB
import Synchronization
import Testing
import TestSupport

/// The one-way data flow: a host hook returns its choice; a commit's position goes to the
/// context the session was made for, never to whichever context is current.
@Suite(.timeLimit(.minutes(1))) struct HostChoiceAndConsistencyTests {
    @Test func aChooseHostHookBindsTheSessionToTheHostItReturns() async throws {
        let database = FakeDatabase()
        let asked = Mutex<[String?]>([])
        let connect = DBConnect.fake(host: nil, database: database, chooseHost: { request in
            asked.withLock { $0.append(request.consistencyToken) }
            return DBHostChoice("db2", fallbacks: ["db3"])
        })
        try await withDBContext {
            DBContext.current?.consistencyToken = "7"
            let session = try await connect.session()
            #expect(session.host == "db2")
            try await session.execute("INSERT")
        }
        #expect(database.enginesCreated == ["db2"])
        #expect(asked.withLock { $0 } == ["7"], "the hook sees the context's read-your-own-writes position")
        #expect(connect.host == nil, "a returned choice leaves the connect's default alone")
    }

    @Test func theFallbacksOfAChoiceServeWhenItsHostCannot() async throws {
        let database = FakeDatabase()
        database.setReachable("db2", false)
        let failed = Mutex<[String]>([])
        let connect = DBConnect.fake(host: nil, database: database, chooseHost: { _ in
            DBHostChoice("db2", fallbacks: ["db2", "db3"]) { host, _ in failed.withLock { $0.append(host) } }
        })
        let host = try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            return session.host
        }
        #expect(host == "db3")
        #expect(failed.withLock { $0 } == ["db2"], "db2 is tried once, though the choice named it twice")
    }

    @Test func anEmptyChosenHostIsAClearError() async throws {
        let connect = DBConnect.fake(host: nil, chooseHost: { _ in DBHostChoice("db1", fallbacks: [""]) })
        let error = await expectDBError(.emptyHost) {
            try await withDBContext { _ = try await connect.session() }
        }
        #expect(error?.connect == "default")
    }

    @Test(.runsServices) func aChoiceThatRetiresOtherHostsDrainsTheirEnginesInTheConnectsRun() async throws {
        let database = FakeDatabase()
        let primary = Mutex("db1")
        let connect = running(DBConnect.fake(host: nil, database: database, chooseHost: { _ in
            DBHostChoice(primary.withLock { $0 }, retiresOtherHosts: true)
        }))
        try await withDBContext { try await connect.session().execute("INSERT") }
        primary.withLock { $0 = "db2" }
        try await withDBContext { try await connect.session().execute("INSERT") }
        try await eventually("the engine of db1 is shut down") { database.enginesShutDown == ["db1"] }
        #expect(database.enginesCreated == ["db1", "db2"])
        primary.withLock { $0 = "db1" }  // back again: a new engine, not the retired one
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db1", "db2", "db1"])
        await connect.close()
    }

    @Test func aBeforeCreateSessionHookStillChoosesWithChangeHost() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(host: nil, database: database, beforeCreateSession: { connect in
            try connect.changeHost("db2", fallbacks: ["db1"])
        })
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db2"])
        #expect(connect.host == "db2", "changeHost also sets the default, as in the Python original")
    }

    @Test func aCommitRecordsItsPositionInTheSessionsContextEvenWhenRunOutsideIt() async throws {
        let connect = DBConnect.fake()
        let context = DBContext()
        try await context.run { try await connect.session().execute("INSERT") }
        let other = DBContext()
        try await other.run {
            try await context.commitAll()  // run while another context is current
        }
        #expect(context.consistencyToken == "1")
        #expect(other.consistencyToken == nil, "the current context is not the session's")
        await context.end()
    }

    @Test func concurrentCommitsKeepTheLatestPositionAndReadsCarryIt() async throws {
        let database = FakeDatabase()  // one commit counter for both
        let first = DBConnect.fake(label: "first", database: database)
        let second = DBConnect.fake(label: "second", database: database)
        try await withDBContext {
            try await first.session().execute("INSERT")
            try await second.session().execute("INSERT")
            try await second.commit()  // position 1
            try await first.commit()  // position 2
            try await first.session().execute("INSERT")
            try await first.commit()  // position 3
            #expect(DBContext.current?.consistencyToken == "3")
            DBContext.current?.consistencyToken = "9"  // a client's newer token
            try await second.session().execute("INSERT")
            try await second.commit()  // position 4: older than the client's
            #expect(DBContext.current?.consistencyToken == "9")
        }
    }

    @Test func aSessionOutsideTheContextStillAdvancesTheRequestsPosition() async throws {
        let connect = DBConnect.fake()
        try await withDBContext {
            try await connect.withTransaction { try await $0.execute("INSERT") }
            #expect(DBContext.current?.consistencyToken == "1")
        }
    }

    @Test func aCommitThatWroteNothingReportsNoPosition() async throws {
        let connect = DBConnect.fake()
        try await withDBContext {
            try await connect.session().execute("SELECT")
            try await connect.commit()
            #expect(DBContext.current?.consistencyToken == nil)
        }
    }
}
