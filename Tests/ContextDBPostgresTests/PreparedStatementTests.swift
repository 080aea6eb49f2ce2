import ContextDB
import ContextDBPostgres
import Logging
import PostgresNIO
import Testing
import TestSupport

/// The statement cache against the real primary: what the server has prepared is read from
/// `pg_prepared_statements` on the same connection (a pool of one).
@Suite(.enabled(if: TestCluster.isAvailable), .timeLimit(.minutes(3)))
struct PreparedStatementTests {
    /// A connect with one connection, so every session sees the same server session.
    private func withConnect<R>(
        statementCacheSize: Int = 100, _ body: (DBConnect<PostgresEngine>) async throws -> R
    ) async throws -> R {
        let connect = try DBConnect(url: TestCluster.primaryURL, maximumConnections: 1, statementCacheSize: statementCacheSize)
        return try await using(connect) { try await body(connect) }
    }

    /// The connection's prepared statements whose SQL contains `marker`.
    private func prepared(_ connect: DBConnect<PostgresEngine>, matching marker: String) async throws -> [String] {
        try await connect.withSession { session in
            try await session.query(
                "SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%' || \(marker) || '%' AND statement NOT LIKE '%pg_prepared_statements%'",
                prepared: false
            ).map { try $0.decode(String.self) }
        }
    }

    @Test func aStatementIsPreparedOnceAndReusedBySessionsOnTheConnection() async throws {
        try await withConnect { connect in
            for id in 1...3 {
                let value = try await connect.withSession { session in
                    try await session.queryValue("SELECT \(id)::int + 0 AS marker_reuse", as: Int.self)
                }
                #expect(value == id)
            }
            #expect(try await prepared(connect, matching: "marker_reuse").count == 1)
        }
    }

    @Test func aStatementRunUnpreparedIsNotPrepared() async throws {
        try await withConnect { connect in
            _ = try await connect.withSession { try await $0.query("SELECT 1 AS marker_unprepared", prepared: false) }
            #expect(try await prepared(connect, matching: "marker_unprepared").isEmpty)
        }
        try await withConnect(statementCacheSize: 0) { connect in
            _ = try await connect.withSession { try await $0.query("SELECT 1 AS marker_cache_off") }
            #expect(try await prepared(connect, matching: "marker_cache_off").isEmpty, "a cache size of 0 turns preparing off")
        }
    }

    @Test func theSameSQLWithOtherParameterTypesIsAnotherStatement() async throws {
        try await withConnect { connect in
            try await connect.withSession { session async throws in
                #expect(try await session.queryValue("SELECT \(Int64(7)) + 0 AS marker_types", as: Int64.self) == 7)
                #expect(try await session.queryValue("SELECT \(Int32(8)) + 0 AS marker_types", as: Int32.self) == 8)
                let none: Int64? = nil
                #expect(try await session.queryValue("SELECT \(none) + 0 AS marker_types", as: Int64?.self) == .some(nil))
                #expect(try await session.queryValue("SELECT \(Int64(9)) + 0 AS marker_types", as: Int64.self) == 9)
            }
            #expect(try await prepared(connect, matching: "marker_types").count == 3, "int8, int4 and an untyped NULL")
        }
    }

    @Test func aConnectionPreparesNoMoreThanTheCacheSize() async throws {
        try await withConnect(statementCacheSize: 2) { connect in
            try await connect.withSession { session async throws in
                for column in ["a", "b", "c", "d"] {
                    #expect(try await session.queryValue("SELECT 1 AS marker_bound_\(unescaped: column)", as: Int.self) == 1)
                }
            }
            #expect(try await prepared(connect, matching: "marker_bound_").count == 2, "past the bound, statements run unnamed")
        }
    }

    @Test func aStatementWhoseFirstRunFailedIsPreparedAnewOnceItCanBe() async throws {
        let table = "prepared_later_\(UInt32.random(in: 0...UInt32.max))"
        try await withConnect { connect in
            await expectDBError(.queryFailed) {
                _ = try await connect.withSession { try await $0.query("SELECT count(*)::int FROM \(unescaped: table)") }
            }
            try await connect.withTransaction { try await $0.execute("CREATE TABLE \(unescaped: table) (a int)") }
            let count = try await connect.withSession {
                try await $0.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self)
            }
            #expect(count == 0, "the failed preparation does not stick to the statement")
            try await connect.withTransaction { try await $0.execute("DROP TABLE \(unescaped: table)") }
        }
    }

    @Test func afterASchemaChangeTheFirstStatementOfATransactionIsPreparedAnewAndRetried() async throws {
        let table = "prepared_schema_\(UInt32.random(in: 0...UInt32.max))"
        try await withConnect { connect in
            try await connect.withTransaction { try await $0.execute("CREATE TABLE \(unescaped: table) (a int)") }
            try await connect.withTransaction { try await $0.execute("INSERT INTO \(unescaped: table) VALUES (1)") }
            let select: PostgresQuery = "SELECT * FROM \(unescaped: table)"
            #expect(try await connect.withSession { try await $0.query(select) }.count == 1)
            try await connect.withTransaction { try await $0.execute("ALTER TABLE \(unescaped: table) ADD COLUMN b int DEFAULT 2") }
            // First in its transaction: nothing to lose, so it is retried in a new one.
            let row = try #require(try await connect.withSession { try await $0.query(select) }.first)
            let (a, b) = try row.decode((Int, Int).self)
            #expect(a == 1 && b == 2, "the statement was prepared anew and sees the new shape")

            try await connect.withTransaction { try await $0.execute("ALTER TABLE \(unescaped: table) ADD COLUMN c int DEFAULT 3") }
            // After another statement of the transaction: the transaction is aborted, so the
            // error says so, and the next transaction runs the statement prepared anew.
            let error = await expectDBError(.queryFailed) {
                _ = try await connect.withSession { session in
                    try await session.execute("INSERT INTO \(unescaped: table) (a) VALUES (7)")
                    return try await session.query(select)
                }
            }
            #expect(error?.sqlState == "0A000")
            #expect(error?.message.contains("retry the transaction") == true)
            // The same when the earlier statement went straight to the connection.
            #expect(try await connect.withSession { try await $0.query(select) }.count == 1, "prepared anew")
            try await connect.withTransaction { try await $0.execute("ALTER TABLE \(unescaped: table) ADD COLUMN d int DEFAULT 4") }
            await expectDBError(.queryFailed) {
                _ = try await connect.withSession { session in
                    try await session.withConnection { connection in
                        _ = try await connection.query("INSERT INTO \(unescaped: table) (a) VALUES (8)", logger: Logger(label: "test"))
                    }
                    return try await session.query(select)
                }
            }
            let rows = try await connect.withSession { try await $0.query(select) }
            #expect(rows.count == 1, "the inserts of the failed transactions were rolled back, not committed by a retry")
            #expect(try rows.first?.decode((Int, Int, Int, Int).self) != nil)
            try await connect.withTransaction { try await $0.execute("DROP TABLE \(unescaped: table)") }
        }
    }

    @Test func statementsDeallocatedByTheAppArePreparedAnew() async throws {
        try await withConnect { connect in
            let query: PostgresQuery = "SELECT 5 AS marker_deallocated"
            #expect(try await connect.withSession { try await $0.queryValue(query, as: Int.self) } == 5)
            try await connect.withTransaction { try await $0.execute("DEALLOCATE ALL", prepared: false) }
            await expectDBError(.queryFailed) {
                _ = try await connect.withSession { try await $0.queryValue(query, as: Int.self) }
            }
            #expect(try await connect.withSession { try await $0.queryValue(query, as: Int.self) } == 5)
        }
    }
}
