import ContextDB
import ContextDBPostgres
import Hummingbird
import PostgresNIO

/// The nine routes of the Python original's example app, under the same paths, with the same
/// statuses and row counts (`../shared/reference/original-behaviour.md`).
struct ExampleRoutes: Sendable {
    let database: ExampleDatabase
    var connect: DBConnect<PostgresEngine> { database.primary }

    /// An error a handler throws on purpose; the middleware rolls back and the client gets a 500.
    struct IntendedFailure: Error {}

    func add(to router: Router<BasicRequestContext>) {
        router.post("/simple_usage") { _, _ in try await simpleUsage() }
        router.post("/atomic_base_example") { _, _ in try await atomicBaseExample() }
        router.post("/atomic_and_previous_transaction") { _, _ in try await atomicAndPreviousTransaction() }
        router.post("/early_commit") { _, _ in try await earlyCommit() }
        router.post("/concurrent_queries") { _, _ in try await concurrentQueries() }
        router.post("/early_rollback") { _, _ in try await earlyRollback() }
        router.post("/auto_rollback_by_exception") { _, _ in try await autoRollbackByException() }
        router.post("/auto_rollback_by_status_code") { _, _ in try await autoRollbackByStatusCode() }
        router.post("/early_connection_close") { _, _ in try await earlyConnectionClose() }
    }

    func insert(_ session: DBSession<PostgresEngine>, _ text: String) async throws {
        try await session.execute("INSERT INTO example (text) VALUES (\(text))")
    }

    /// One insert through the context session; the middleware commits it.
    func simpleUsage() async throws -> HTTPResponse.Status {
        try await insert(connect.session(), "simple_usage")
        return .ok
    }

    /// An insert in an atomic block (committed at its end), then one the middleware commits.
    func atomicBaseExample() async throws -> HTTPResponse.Status {
        try await connect.atomic { try await insert($0, "atomic") }
        try await insert(connect.session(), "after atomic")
        return .ok
    }

    /// Every atomic mode against an already open transaction; `.fail` ends the request with a 500.
    func atomicAndPreviousTransaction() async throws -> HTTPResponse.Status {
        let session = try await connect.session()
        try await insert(session, "open before commit")
        try await connect.atomic(.commit) { try await insert($0, "atomic commit") }
        try await insert(session, "open before rollback (rolled back)")
        try await connect.atomic(.rollback) { try await insert($0, "atomic rollback") }
        try await insert(session, "open before append")
        try await connect.atomic(.append) { try await insert($0, "atomic append") }
        try await insert(session, "open before failing append (rolled back)")
        do {
            try await connect.atomic(.append) { session in
                try await insert(session, "failing append (rolled back)")
                throw IntendedFailure()
            }
        } catch is IntendedFailure {}
        try await insert(session, "open before fail (rolled back)")
        try await connect.atomic(.fail) { try await insert($0, "never runs") }
        return .ok
    }

    /// Commits early, closes the session, and goes on with a new one.
    func earlyCommit() async throws -> HTTPResponse.Status {
        let session = try await connect.session()
        try await insert(session, "early commit 1")
        try await session.commit()
        try await insert(session, "early commit 2")
        try await connect.commit()
        try await connect.closeSession()
        try await insert(connect.session(), "new session 1")
        try await insert(connect.session(), "new session 2")
        return .ok
    }

    /// Six concurrent inserts, each with its own session; the one that throws is rolled back.
    func concurrentQueries() async throws -> HTTPResponse.Status {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await insert(connect.session(), "context session") }
            group.addTask { try await withDBContext { try await insert(connect.session(), "new context") } }
            group.addTask {
                try await withDBContext {
                    try await insert(connect.session(), "new context, manual commit")
                    try await connect.commit()
                    try await connect.closeSession()
                }
            }
            group.addTask { try await connect.withTransaction { try await insert($0, "non-context atomic") } }
            group.addTask {
                try await connect.withSession { session in
                    try await insert(session, "non-context, manual commit")
                    try await session.commit()
                }
            }
            group.addTask {
                try? await withDBContext {
                    try await insert(connect.session(), "new context that throws (rolled back)")
                    throw IntendedFailure()
                }
            }
            try await group.waitForAll()
        }
        return .ok
    }

    /// Rolls back twice: through the connect and through the session.
    func earlyRollback() async throws -> HTTPResponse.Status {
        let session = try await connect.session()
        try await insert(session, "rolled back 1")
        try await connect.rollback()
        try await insert(session, "rolled back 2")
        try await session.rollback()
        return .ok
    }

    /// Inserts, then throws: the middleware rolls back; 500.
    func autoRollbackByException() async throws -> HTTPResponse.Status {
        try await insert(connect.session(), "rolled back by exception")
        throw IntendedFailure()
    }

    /// Inserts, then answers 500: the middleware rolls back.
    func autoRollbackByStatusCode() async throws -> Response {
        try await insert(connect.session(), "rolled back by status")
        return Response(status: .internalServerError)
    }

    /// Commits in an atomic block, gives the connection back early, and later writes again.
    func earlyConnectionClose() async throws -> HTTPResponse.Status {
        try await connect.atomic { try await insert($0, "before close") }
        try await connect.closeSession()
        // ... long work that needs no connection would go here ...
        try await insert(connect.session(), "after close")
        return .ok
    }
}
