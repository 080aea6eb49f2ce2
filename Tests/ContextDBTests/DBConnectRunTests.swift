import ContextDB
import ContextDBTesting
import Synchronization
import Testing
import TestSupport

/// `DBConnect.run()`: engines' background work runs as its child tasks, and ends with it.
@Suite(.timeLimit(.minutes(1))) struct DBConnectRunTests {
    @Test func runRunsEveryEngineItCreatesAndClosesThemWhenCancelled() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(host: nil, database: database, chooseHost: { _ in DBHostChoice("db1") })
        try await withRunningServices([connect]) {
            try await withDBContext { try await connect.session().execute("INSERT") }
            try await eventually("the engine runs") { database.enginesRunning == ["db1"] }
        }
        #expect(database.enginesShutDown == ["db1"], "cancelling run() closes the engines")
        #expect(database.enginesRunning.isEmpty, "every engine's run() ended with the connect's")
    }

    @Test func anEngineCreatedBeforeRunStartsRunsOnceItDoes() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesRunning.isEmpty)
        try await withRunningServices([connect]) {
            try await eventually("the engine runs") { database.enginesRunning == ["db1"] }
        }
    }

    @Test func aConnectRunsAgainAfterItsRunReturned() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        for round in 1...2 {
            try await withRunningServices([connect]) {
                try await withDBContext { try await connect.session().execute("INSERT") }
                try await eventually("round \(round): the new engine runs") { database.enginesRunning == ["db1"] }
            }
            #expect(database.enginesRunning.isEmpty)
        }
        #expect(database.enginesShutDown == ["db1", "db1"], "each run closed its engine")
    }

    @Test func anEngineRetiredWhileNothingRunsIsDrainedByTheNextRun() async throws {
        let database = FakeDatabase()
        let primary = Mutex("db1")
        let connect = DBConnect.fake(host: nil, database: database, chooseHost: { _ in
            DBHostChoice(primary.withLock { $0 }, retiresOtherHosts: true)
        })
        try await withDBContext { try await connect.session().execute("INSERT") }
        primary.withLock { $0 = "db2" }
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.enginesShutDown.isEmpty)
        try await withRunningServices([connect]) {
            try await eventually("db1's engine is drained") { database.enginesShutDown == ["db1"] }
        }
    }

    @Test func aSecondRunIsAClearError() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withRunningServices([connect]) {
            try await withDBContext { try await connect.session().execute("INSERT") }
            try await eventually("the first run() runs the engine") { database.enginesRunning == ["db1"] }
            let error = await expectDBError(.invalidConfiguration) { try await connect.run() }
            #expect(error?.description.contains("already") == true)
        }
    }
}
