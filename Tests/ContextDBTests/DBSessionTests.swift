import ContextDB
import Testing
import TestSupport

@Suite(.timeLimit(.minutes(1))) struct DBSessionTests {
    @Test func commitAndRollbackKeepTheConnectionAndBeginAgain() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await session.commit()
            #expect(!session.isInTransaction)
            #expect(session.hasConnection)
            try await session.execute("INSERT")
            try await session.rollback()
            try await session.execute("INSERT")
        }
        #expect(database.log == [
            "lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: COMMIT",
            "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK",
            "c1: BEGIN", "c1: INSERT", "c1: COMMIT", "release c1",
        ])
        #expect(database.committedRows == 2)
    }

    @Test func commitAndRollbackWithoutATransactionRunNothing() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.commit()
            try await session.rollback()
            try await connect.commit()
            try await connect.rollback()
        }
        #expect(database.log.isEmpty)
    }

    @Test func sessionOptionsShapeTheBegin() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(
            options: DBSessionOptions(readOnly: true, isolationLevel: .serializable), database: database
        )
        try await withDBContext { try await connect.session().execute("SELECT") }
        #expect(database.statements == ["c1: BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", "c1: SELECT", "c1: COMMIT"])
    }

    @Test func closeRollsBackReleasesAndRefusesFurtherUse() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            await session.close()
            #expect(database.leasedCount == 0)
            await expectDBError(.sessionClosed) { try await session.execute("INSERT") }
            let next = try await connect.session()
            #expect(next !== session)
        }
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: INSERT", "c1: ROLLBACK", "release c1"])
        #expect(database.committedRows == 0)
    }

    @Test func aFailedStatementMakesTheCommitFailInsteadOfLyingAboutIt() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("BAD")
        let error = await expectDBError(.commitFailed) {
            try await withDBContext {
                let session = try await connect.session()
                try await session.execute("INSERT")
                try? await session.execute("BAD")  // swallowed: the server aborted the transaction
            }
        }
        // The server decides: its COMMIT of an aborted transaction is a rollback.
        #expect(error?.message.contains("rolled") == true)
        #expect(database.committedRows == 0)
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: BAD", "c1: COMMIT"])
        #expect(database.leasedCount == 0)
    }

    @Test func aSwallowedFailureFailsTheEndOfAnAtomicBlock() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("BAD")
        try await withDBContext {
            await expectDBError(.commitFailed) {
                try await connect.atomic(.commit) { session in
                    try await session.execute("INSERT")
                    try? await session.execute("BAD")
                }
            }
            try await connect.session().execute("INSERT")  // the session serves the next transaction
        }
        #expect(database.committedRows == 1)
    }

    @Test func aTransactionRecoveredWithASavepointCommits() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("BAD")
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await session.execute("SAVEPOINT s")
            await #expect(throws: FakeError.statementFailed("BAD")) { try await session.execute("BAD") }
            try await session.execute("ROLLBACK TO SAVEPOINT s")
            try await session.execute("INSERT")
        }
        #expect(database.committedRows == 2)
    }

    @Test func aConnectionTheServerEndedFailsTheTransactionAndIsNeverPooled() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        let error = await expectDBError(.commitFailed) {
            try await withDBContext {
                let session = try await connect.session()
                try await session.execute("INSERT")
                database.terminateLeasedConnections()
                let lost = await expectDBError(.connectionLost) { try await session.execute("SELECT") }
                #expect(lost?.host == "db1")
                #expect(!session.hasConnection)
                #expect(session.isInTransaction)
                // No statement runs outside the lost transaction as if nothing happened.
                await expectDBError(.connectionLost) { try await session.execute("INSERT") }
            }
        }
        #expect(error?.connect == "primary")
        #expect(error?.message.contains("lost") == true)
        #expect(database.committedRows == 0)
        #expect(database.log.contains("release c1 broken"))
        #expect(database.leasedCount == 0)
        // The next request on the same connect works.
        try await withDBContext { try await connect.session().execute("INSERT") }
        #expect(database.committedRows == 1)
    }

    @Test func aLostTransactionIsForgottenByARollback() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            database.terminateLeasedConnections()
            await expectDBError(.connectionLost) { try await session.execute("SELECT") }
            try await session.rollback()
            try await session.execute("INSERT")
        }
        #expect(database.committedRows == 1)
        #expect(database.leasedCount == 0)
    }

    @Test func aConnectionEndedBetweenTransactionsIsReplacedBeforeBegin() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            try await session.commit()
            database.terminateLeasedConnections()
            try await session.execute("INSERT")  // nothing was open: a new connection serves
        }
        #expect(database.committedRows == 2)
        #expect(database.log.contains("release c1 broken"))
        #expect(database.statements.suffix(3) == ["c2: BEGIN", "c2: INSERT", "c2: COMMIT"])
    }

    @Test func aCommitWhoseAnswerWasLostIsReportedAsUnknownAndNeverRetried() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        database.loseNextCommitAnswer()
        let error = await expectDBError(.commitOutcomeUnknown) {
            try await withDBContext { try await connect.session().execute("INSERT") }
        }
        #expect(error?.connect == "primary")
        #expect(database.committedRows == 1, "it did commit: the outcome was only unknown to the client")
        #expect(database.statements == ["c1: BEGIN", "c1: INSERT", "c1: COMMIT"], "no ROLLBACK, no second COMMIT")
        #expect(database.log.contains("release c1 broken"))
        #expect(database.leasedCount == 0)
    }

    @Test func aCommitOnAConnectionTheServerEndedFails() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        await expectDBError(.commitFailed) {
            try await withDBContext {
                try await connect.session().execute("INSERT")
                database.terminateLeasedConnections()
            }
        }
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
        #expect(database.log.contains("release c1 broken"))
    }

    @Test func aRollbackAfterAFailedStatementRecovers() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("BAD")
        try await withDBContext {
            let session = try await connect.session()
            try? await session.execute("BAD")
            try await session.rollback()
            try await session.execute("INSERT")
        }
        #expect(database.committedRows == 1)
    }

    @Test func aFailingCommitIsReportedAndCommitsNothing() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        database.failNext("COMMIT")
        try await withDBContext(ifActive: .fail) {
            let session = try await connect.session()
            try await session.execute("INSERT")
            let error = await expectDBError(.commitFailed) { try await session.commit() }
            #expect(error?.connect == "primary")
            #expect(error?.host == "db1")
            #expect(!session.isInTransaction)
        }
        #expect(database.committedRows == 0)
        #expect(database.leasedCount == 0)
    }

    @Test func aConnectionWhoseRollbackFailsIsNotPooled() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("ROLLBACK")
        try await withDBContext {
            let session = try await connect.session()
            try await session.execute("INSERT")
            await session.close()
        }
        #expect(database.log.last == "release c1 broken")
    }

    @Test func aFailingBeginReleasesTheConnectionAsBroken() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        database.failNext("BEGIN")
        await #expect(throws: FakeError.statementFailed("BEGIN")) {
            try await withDBContext { try await connect.session().execute("INSERT") }
        }
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "release c1 broken"])
    }

    @Test func twoTasksUsingOneSessionAtOnceGetAnError() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            async let parked: Void = session.execute("WAIT")
            await database.waitUntilParked()
            await expectDBError(.sessionBusy) { try await session.execute("INSERT") }
            await expectDBError(.sessionBusy) { try await session.commit() }
            database.openGates()
            try await parked
            try await session.execute("INSERT")
        }
        #expect(database.statements == ["c1: BEGIN", "c1: WAIT", "c1: INSERT", "c1: COMMIT"])
    }

    @Test func closingABusySessionReleasesWhenTheStatementEnds() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(database: database)
        try await withDBContext {
            let session = try await connect.session()
            async let parked: Void = session.execute("WAIT")
            await database.waitUntilParked()
            await session.close()
            #expect(database.leasedCount == 1)
            database.openGates()
            try await parked
            #expect(database.leasedCount == 0)
        }
        #expect(database.log == ["lease c1@db1", "c1: BEGIN", "c1: WAIT", "c1: ROLLBACK", "release c1"])
    }
}
