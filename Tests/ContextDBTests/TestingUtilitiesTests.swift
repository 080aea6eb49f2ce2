import ContextDB
import ContextDBTesting
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1)))
struct TestingUtilitiesTests {
    @Test func aTransactionalTestTurnsTheAppsTransactionsIntoSavepointsAndCommitsNothing() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        let statuses = try await withTransactionalTest(connect) {
            [
                await serve {  // early commit, close, new session
                    let session = try await connect.session()
                    try await session.execute("INSERT")
                    try await session.commit()
                    try await connect.closeSession()
                    try await connect.session().execute("INSERT")
                    return 200
                },
                await serve {  // an atomic block, an early rollback, a failure status
                    try await connect.atomic { try await $0.execute("INSERT") }
                    try await connect.session().execute("INSERT")
                    try await connect.rollback()
                    return 500
                },
            ]
        }
        #expect(statuses == [200, 500])
        #expect(database.log == [
            "lease c1@db1", "c1: BEGIN",
            "c1: SAVEPOINT contextdb_sp_1", "c1: INSERT", "c1: RELEASE SAVEPOINT contextdb_sp_1",
            "c1: SAVEPOINT contextdb_sp_2", "c1: INSERT",
            "c1: RELEASE SAVEPOINT contextdb_sp_2",  // the end of the request, as a savepoint
            "c1: SAVEPOINT contextdb_sp_3", "c1: INSERT", "c1: RELEASE SAVEPOINT contextdb_sp_3",
            "c1: SAVEPOINT contextdb_sp_4", "c1: INSERT",
            "c1: ROLLBACK TO SAVEPOINT contextdb_sp_4", "c1: RELEASE SAVEPOINT contextdb_sp_4",
            "c1: ROLLBACK", "release c1",
        ])
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
    }

    @Test func concurrentRequestsInOneTestAreSerializedNotRefused() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withTransactionalTest(connect) {
            async let first = serve {
                try await connect.session().execute("WAIT")
                return 200
            }
            await database.waitUntilParked()
            async let second = serve {
                try await connect.session().execute("INSERT")  // waits for the connection
                return 200
            }
            try await Task.sleep(for: .milliseconds(50))
            #expect(!database.statements.contains("c1: INSERT"), "the second request waits")
            database.openGates()
            #expect(await [first, second] == [200, 200])
        }
        #expect(database.statements == [
            "c1: BEGIN", "c1: SAVEPOINT contextdb_sp_1", "c1: WAIT", "c1: INSERT",  // serialized, one savepoint
            "c1: RELEASE SAVEPOINT contextdb_sp_1",  // the first request's end
            "c1: ROLLBACK",
        ])
    }

    @Test func nestedContextsInsideATransactionalTestUseTheSavepointSession() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withTransactionalTest(connect) {
            try await withDBContext { try await connect.session().execute("INSERT") }  // committed: released
            try await connect.withSession { _ in }  // outside any context: a session of its own
        }
        #expect(database.log.filter { $0.hasPrefix("lease") } == ["lease c1@db1"])
        #expect(database.statements == [
            "c1: BEGIN", "c1: SAVEPOINT contextdb_sp_1", "c1: INSERT", "c1: RELEASE SAVEPOINT contextdb_sp_1", "c1: ROLLBACK",
        ])
        #expect(database.committedRows == 0)
    }

    @Test func strictModeKeepsTheReplicaOnItsOwnConnection() async throws {
        let database = FakeDatabase()
        let primary = DBConnect.fake(label: "primary", database: database)
        let replica = DBConnect.fake(label: "replica", host: "replica1", options: DBSessionOptions(readOnly: true), database: database)
        for mode in [DBTestReplicaMode.shareTestConnection, .strict] {
            database.clearLog()
            try await withTransactionalTest(primary, replicas: [replica], replicaMode: mode) {
                try await replica.session().execute("SELECT")
            }
            let replicaLeases = database.log.filter { $0.hasSuffix("@replica1") }.count
            #expect(replicaLeases == (mode == .strict ? 1 : 0), "\(mode)")
        }
    }

    @Test func aRollbackSessionUndoesEvenWhatItCommits() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await connect.withRollbackSession { session in
            try await session.execute("INSERT")
            try await session.commit()
        }
        #expect(database.committedRows == 0)
        #expect(database.statements.last == "c1: ROLLBACK")
        #expect(database.leasedCount == 0)
    }

    @Test func aTestContextMakesTheMiddlewarePassThrough() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withTestDBContext(commits: false) {
            _ = await serve {
                try await connect.session().execute("INSERT")
                return 200
            }
            #expect(database.committedRows == 0, "the request did not commit: the test context owns it")
            #expect(database.leasedCount == 1)
        }
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
        try await withTestDBContext {
            _ = await serve {
                try await connect.session().execute("INSERT")
                return 200
            }
        }
        #expect(database.committedRows == 1, "it commits like the middleware")
    }
}
