import ContextDB
import ContextDBPostgres
import Testing
import TestSupport

/// `DBConnect.preventsWrites` against the real primary: writes fail fast, reads keep working.
@Suite(.enabled(if: TestCluster.isAvailable), .runsServices, .timeLimit(.minutes(1)))
struct WritePreventionTests {
    @Test func preventedWritesFailWhileReadsWork() async throws {
        let connect = try running(DBConnect(label: "primary", url: TestCluster.primaryURL))
        let table = "write_prevention_\(UInt32.random(in: 0...UInt32.max))"
        try await connect.withTransaction { try await $0.execute("CREATE TABLE \(unescaped: table) (id int)") }

        connect.preventsWrites = true
        let error = await expectDBError(.writesPrevented) {
            try await withDBContext {
                let session = try await connect.session()
                _ = try await session.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self)  // reads work
                try await session.execute("INSERT INTO \(unescaped: table) VALUES (1)")
            }
        }
        #expect(error?.message.contains("writes are prevented") == true, "\(String(describing: error))")
        #expect(error?.httpAnswer().status == 503)
        let read = try await withDBContext {
            try await connect.session().queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self)
        }
        #expect(read == 0)

        connect.preventsWrites = false
        try await withDBContext { try await connect.session().execute("INSERT INTO \(unescaped: table) VALUES (1)") }
        try await connect.withTransaction { session in
            #expect(try await session.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self) == 1)
            try await session.execute("DROP TABLE \(unescaped: table)")
        }
        await connect.close()
    }
}
