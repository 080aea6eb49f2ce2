import ContextDB
import Synchronization
import Testing
import TestSupport

@Suite struct HTTPAnswerTests {
    @Test(arguments: [
        (DBError.Code.noHostAvailable, nil, 503, 1),
        (.connectionFailed, nil, 503, 1),
        (.notRunning, false, 503, 1),
        (.writesPrevented, nil, 503, 1),
        (.connectionLost, false, 503, 1),
        (.connectionLost, nil, 503, 1),
        // After the request committed work a retry could write twice: 500.
        (.noHostAvailable, true, 500, nil),
        (.connectionFailed, true, 500, nil),
        (.writesPrevented, true, 500, nil),
        (.connectionLost, true, 500, nil),
        (.readOnlySession, nil, 409, nil),
        (.statementTimeout, false, 500, nil),
        (.engineCreationFailed, nil, 500, nil),
        (.commitFailed, false, 500, nil),
        (.commitOutcomeUnknown, false, 500, nil),
        (.queryFailed, false, 500, nil),
    ] as [(DBError.Code, Bool?, Int, Int?)])
    func eachErrorHasItsStatus(code: DBError.Code, committed: Bool?, status: Int, retryAfter: Int?) {
        var error = DBError(code, "details of db1.internal:5432", connect: "primary", host: "db1.internal:5432")
        error.requestCommittedWork = committed
        let answer = error.httpAnswer()
        #expect(answer.status == status, "\(code)")
        #expect(answer.retryAfter == retryAfter, "\(code)")
        #expect(!answer.message.contains("db1"), "no host for the public: \(answer.message)")
        #expect(error.httpAnswer(exposingDetails: true).message.contains("db1.internal:5432"))
    }

    @Test func aRequestKnowsWhetherItCommittedBeforeItsConnectionWasLost() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        // Nothing committed: the lost connection is the request's only outcome.
        let untouched = await expectDBError(.connectionLost) {
            _ = try await withDBRequest(statusCode: { (_: Int) in 200 }) {
                let session = try await connect.session()
                try await session.execute("INSERT")
                database.terminateLeasedConnections()
                try await session.execute("SELECT")
                return 200
            }
        }
        #expect(untouched?.requestCommittedWork == false)
        #expect(untouched?.httpAnswer().status == 503)
        // Lost between the last statement and COMMIT: the server rolled it back; a 503 too.
        let beforeCommit = await expectDBError(.commitFailed) {
            _ = try await withDBRequest(statusCode: { (_: Int) in 200 }) {
                try await connect.session().execute("INSERT")
                database.terminateLeasedConnections()
                return 200
            }
        }
        #expect(beforeCommit?.httpAnswer().status == 503, "\(String(describing: beforeCommit))")
        #expect(beforeCommit?.httpAnswer().retryAfter == 1)
        // An early commit, then the loss: a retry of the request would write twice.
        let committed = await expectDBError(.connectionLost) {
            _ = try await withDBRequest(statusCode: { (_: Int) in 200 }) {
                let session = try await connect.session()
                try await session.execute("INSERT")
                try await session.commit()
                try await session.execute("INSERT")
                database.terminateLeasedConnections()
                try await session.execute("SELECT")
                return 200
            }
        }
        #expect(committed?.requestCommittedWork == true)
        #expect(committed?.httpAnswer().status == 500)
        #expect(database.committedRows == 1)
    }

    @Test func aCommitInANestedContextCountsForTheRequest() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        let error = await expectDBError(.connectionLost) {
            _ = try await withDBRequest(statusCode: { (_: Int) in 200 }) {
                try await withDBContext { try await connect.session().execute("INSERT") }  // committed at its end
                let session = try await connect.session()
                try await session.execute("INSERT")
                database.terminateLeasedConnections()
                try await session.execute("SELECT")
                return 200
            }
        }
        #expect(error?.requestCommittedWork == true)
        #expect(error?.httpAnswer().status == 500)
    }

    @Test func onlyAReadOnlyConnectsSessionMovesToItsNextHost() async throws {
        for readOnly in [true, false] {
            let database = FakeDatabase()
            let connect = DBConnect.fake(
                label: "replica", options: DBSessionOptions(readOnly: readOnly), database: database,
                chooseHost: { _ in DBHostChoice("db1", fallbacks: ["db2"]) }
            )
            try await withDBContext {
                let session = try await connect.session()
                try await session.execute("SELECT")
                let moved = await session.moveToNextHost(after: DBError(.connectionLost, "lost"), hostIsSuspect: false)
                #expect(moved == readOnly)
                #expect(session.host == (readOnly ? "db2" : "db1"))
                try await session.execute("SELECT")  // runs on its (new) host
                // db2 is the last candidate: nowhere left to move.
                #expect(await session.moveToNextHost(after: DBError(.connectionLost, "lost"), hostIsSuspect: false) == false)
            }
            #expect(database.enginesCreated.contains("db2") == readOnly, "only the read-only session reached db2")
            #expect(database.leasedCount == 0)
        }
    }

    @Test func preventedWritesBeginReadOnlyTransactionsUntilAllowedAgain() async throws {
        let database = FakeDatabase()
        let connect = DBConnect.fake(label: "primary", database: database)
        connect.preventsWrites = true
        try await withDBContext { try await connect.session().execute("SELECT") }
        connect.preventsWrites = false
        // The process-wide switch, as this task sees it: flipping it for the process would
        // make the tests that run beside this one read-only.
        try await DBWritePrevention.withEverywhere(true) {
            try await withDBContext { try await connect.session().execute("SELECT") }
        }
        try await withDBContext { try await connect.session().execute("SELECT") }
        let begins = database.log.filter { $0.contains("BEGIN") }
        #expect(begins.count == 3)
        #expect(begins.prefix(2).allSatisfy { $0.hasSuffix("BEGIN READ ONLY") }, "\(begins)")
        #expect(!begins[2].contains("READ ONLY"))
    }
}

@Suite struct ReadPreferenceTests {
    @Test func scopesReachTheHostHookOfSessionsCreatedInThem() async throws {
        let seen = Mutex<[DBReadPreference]>([])
        let connect = DBConnect.fake(label: "replica", chooseHost: { request in
            seen.withLock { $0.append(request.readPreference) }
            return DBHostChoice("db1")
        })
        try await withDBContext { _ = try await connect.session() }
        try await withMaxStaleness(.seconds(2)) {
            try await withDBContext { _ = try await connect.session() }
            try await withPrimaryReads {
                try await withDBContext { _ = try await connect.session() }
            }
        }
        let preferences = seen.withLock { $0 }
        #expect(preferences.count == 3)
        #expect(preferences[0] == DBReadPreference())
        #expect(preferences[1].maximumStaleness == .seconds(2) && !preferences[1].primaryOnly)
        #expect(preferences[2].maximumStaleness == .seconds(2) && preferences[2].primaryOnly, "scopes nest")
    }
}
