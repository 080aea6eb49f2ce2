import ContextDB
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1))) struct DBConnectTests {
    @Test func emptyHostIsRejectedByConnectAndChangeHost() async throws {
        let connect = DBConnect.fake()
        let error = await expectDBError(.emptyHost) { try await connect.connect(host: "") }
        #expect(error?.connect == "default")
        await expectDBError(.emptyHost) { try connect.changeHost("") }
        #expect(connect.host == "db1")
    }

    @Test func noHostAndNoHookIsAClearError() async throws {
        let connect = DBConnect.fake(host: nil)
        let error = await expectDBError(.hostNotSet) {
            try await withDBContext { _ = try await connect.session() }
        }
        #expect(error?.description.contains("changeHost") == true)
    }

    @Test func nothingConnectsUntilTheFirstStatement() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            #expect(database.enginesCreated.isEmpty)
            #expect(database.log.isEmpty)
            #expect(!session.hasConnection)
            try await session.execute("INSERT")
            #expect(database.enginesCreated == ["db1"])
            #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: INSERT"])
        }
    }

    @Test func theEngineOfAHostIsCreatedOnceAndReused() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        for _ in 0..<3 {
            try await withDBContext { try await connect.session().execute("INSERT") }
        }
        #expect(database.enginesCreated == ["db1"])
        #expect(database.committedRows == 3)
    }

    @Test func concurrentFirstUsesShareOneEngineCreation() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<50 {
                group.addTask { try await withDBContext { try await connect.session().execute("INSERT") } }
            }
            try await group.waitForAll()
        }
        #expect(database.enginesCreated == ["db1"])
        #expect(database.committedRows == 50)
    }

    @Test func connectCreatesTheEngineNow() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(host: nil, database: database)
        try await connect.connect(host: "db2")
        #expect(connect.host == "db2")
        #expect(database.enginesCreated == ["db2"])
        #expect(database.log.isEmpty)
    }

    @Test func changeHostToTheSameHostDoesNothing() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext { try await connect.session().execute("INSERT") }
        try connect.changeHost("db1")
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db1"])
        #expect(database.enginesShutDown.isEmpty)
    }

    @Test func changeHostToAnotherHostUsesANewEngineAndKeepsBoundSessions() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let before = try await connect.session()
            try connect.changeHost("db2")
            #expect(before.host == "db1")
            try await before.execute("INSERT")
            let fresh = try await withDBContext { try await connect.session().host }
            #expect(fresh == "db2")
        }
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db1", "db2"])
        #expect(connect.engineHosts == ["db1", "db2"])
    }

    @Test func closeShutsEveryEngineAndALaterSessionRecreatesIt() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext { try await connect.session().execute("INSERT") }
        try connect.changeHost("db2")
        try await withDBContext { try await connect.session().execute("INSERT") }
        await connect.close()
        #expect(Set(database.enginesShutDown) == ["db1", "db2"])
        #expect(connect.engineHosts.isEmpty)
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db1", "db2", "db2"])
    }

    @Test func theHookRunsOncePerSessionCreation() async throws {
        let calls = Counter()
        let connect = DBConnect.fake(beforeCreateSession: { _ in calls.increment() })
        try await withDBContext {
            _ = try await connect.session()
            _ = try await connect.session()
            #expect(calls.value == 1)
        }
        try await withDBContext { _ = try await connect.session() }
        #expect(calls.value == 2)
        try await connect.withSession { _ in }
        #expect(calls.value == 3)
    }

    @Test func theHookChoosesTheHostOfEachSessionEvenUnderConcurrency() async throws {
        let connect = DBConnect.fake(host: nil, beforeCreateSession: { connect in
            try connect.changeHost(Wanted.host!)
            await Task.yield()  // let other creations change the connect's default meanwhile
        })
        try await withThrowingTaskGroup(of: (String, String).self) { group in
            for index in 0..<200 {
                let wanted = "db\(index % 3)"
                group.addTask {
                    try await Wanted.$host.withValue(wanted) {
                        try await withDBContext { (wanted, try await connect.session().host) }
                    }
                }
            }
            for try await (wanted, got) in group { #expect(wanted == got) }
        }
    }

    @Test func aHookErrorReachesTheCallerAndNoSessionIsMade() async throws {
        let connect = DBConnect.fake(beforeCreateSession: { _ in throw FakeError.boom })
        await #expect(throws: FakeError.boom) {
            try await withDBContext { _ = try await connect.session() }
        }
    }

    @Test func engineCreationFailureNamesTheHostAndIsRetried() async throws {
        let database = FakeDatabase()
        database.setReachable("down", false)
        let connect = DBConnect.fake(label: "replica", host: "down", database: database)
        let error = await expectDBError(.engineCreationFailed) {
            try await withDBContext { try await connect.session().execute("INSERT") }
        }
        #expect(error?.host == "down")
        #expect(error?.connect == "replica")
        #expect(error?.underlying as? FakeError == .unreachable("down"))
        database.setReachable("down", true)
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.committedRows == 1)
    }

    @Test func aFailingFirstLeaseFallsBackToTheNextHostAndReportsIt() async throws {
        let database = FakeDatabase()
        database.setReachable("down", false)
        let failed = Box<[String]>([])
        let connect = DBConnect.fake(host: nil, database: database, beforeCreateSession: { connect in
            try connect.changeHost("down", fallbacks: ["db2", "db3"]) { host, error in
                #expect(error.code == .engineCreationFailed)
                failed.value.append(host)
            }
        })
        let host = try await withDBContext {
            let session = try await connect.session()
            #expect(session.host == "down")  // chosen, not yet tried
            try await session.execute("INSERT")
            return session.host
        }
        #expect(host == "db2")
        #expect(failed.value == ["down"])
        #expect(database.committedRows == 1)
    }

    @Test func whenEveryHostFailsTheErrorListsThemAll() async throws {
        let database = FakeDatabase()
        database.setReachable("a", false)
        database.setReachable("b", false)
        let connect = DBConnect.fake(label: "replica", host: nil, database: database, beforeCreateSession: { connect in
            try connect.changeHost("a", fallbacks: ["b"])
        })
        let error = await expectDBError(.connectionFailed) {
            try await withDBContext { try await connect.session().execute("SELECT") }
        }
        #expect(error?.host == "a,b")
        #expect(error?.message.contains("tried a (") == true)
        #expect(error?.message.contains(", b (") == true)
    }

    @Test func noFailoverOnceTheSessionHadAConnection() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(host: nil, database: database, beforeCreateSession: { connect in
            try connect.changeHost("db1", fallbacks: ["db2"])
        })
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            database.failNext("ROLLBACK")
            await #expect(throws: FakeError.self) { try await session.rollback() }  // connection dropped
            #expect(!session.hasConnection)
            database.setReachable("db1", false)
            await expectDBError(.connectionFailed) { try await session.execute("INSERT") }
            #expect(session.host == "db1")
        }
        #expect(database.enginesCreated == ["db1"])
    }

    @Test func twoSpellingsOfOneHostShareOneEngine() async throws {
        let database = FakeDatabase()
        let connect = DBConnect<FakeEngine>(
            label: "default", host: "db1",
            normalizeHost: { host in
                guard !host.contains(" ") else { throw DBError(.invalidConfiguration, "a space in the host") }
                return host.contains(":") ? host : host + ":5432"
            }
        ) { host in try database.makeEngine(host: host) }
        #expect(connect.host == "db1:5432")
        try await withDBContext { try await connect.session().execute("INSERT") }
        try connect.changeHost("db1:5432")
        try await withDBContext { try await connect.session().execute("INSERT") }
        try connect.changeHost("db1")
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesCreated == ["db1:5432"], "one server, one engine")
        #expect(throws: DBError.self) { try connect.changeHost("db 1") }
    }
}

enum Wanted {
    @TaskLocal static var host: String?
}
