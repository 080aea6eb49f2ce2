import ContextDB

/// The nine routes of the Python original's example app, free of any web framework: each is
/// a path and a handler that returns the HTTP status to answer with, and the examples mount
/// them with the same statuses and row counts (`../shared/reference/original-behaviour.md`).
public struct ExampleScenarios: Sendable {
    /// An error a handler throws on purpose; the middleware rolls back and the client gets a 500.
    public struct IntendedFailure: Error {}

    /// Every scenario: its `POST` path and its handler, which returns an HTTP status code.
    public let routes: [(path: String, handler: @Sendable () async throws -> Int)]

    /// The scenarios of `database`, on either engine.
    public init<Engine: ExampleEngine>(database: ExampleDatabaseOf<Engine>) {
        routes = Scenarios(connect: database.primary).routes
    }
}

/// The scenarios on one engine's connect.
private struct Scenarios<Engine: ExampleEngine>: Sendable {
    typealias IntendedFailure = ExampleScenarios.IntendedFailure
    let connect: DBConnect<Engine>

    var routes: [(path: String, handler: @Sendable () async throws -> Int)] {
        [
            ("/simple_usage", simpleUsage),
            ("/atomic_base_example", atomicBaseExample),
            ("/atomic_and_previous_transaction", atomicAndPreviousTransaction),
            ("/early_commit", earlyCommit),
            ("/concurrent_queries", concurrentQueries),
            ("/early_rollback", earlyRollback),
            ("/auto_rollback_by_exception", autoRollbackByException),
            ("/auto_rollback_by_status_code", autoRollbackByStatusCode),
            ("/early_connection_close", earlyConnectionClose),
        ]
    }

    func insert(_ session: DBSession<Engine>, _ text: String) async throws {
        try await Engine.insertExample(text, in: session)
    }

    /// One insert through the context session; the middleware commits it.
    func simpleUsage() async throws -> Int {
        try await insert(connect.session(), "simple_usage")
        return 200
    }

    /// An insert in an atomic block (committed at its end), then one the middleware commits.
    func atomicBaseExample() async throws -> Int {
        try await connect.atomic { try await insert($0, "atomic") }
        try await insert(connect.session(), "after atomic")
        return 200
    }

    /// Every atomic mode against an already open transaction; `.fail` ends the request with a 500.
    func atomicAndPreviousTransaction() async throws -> Int {
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
        return 200
    }

    /// Commits early, closes the session, and goes on with a new one.
    func earlyCommit() async throws -> Int {
        let session = try await connect.session()
        try await insert(session, "early commit 1")
        try await session.commit()
        try await insert(session, "early commit 2")
        try await connect.commit()
        try await connect.closeSession()
        try await insert(connect.session(), "new session 1")
        try await insert(connect.session(), "new session 2")
        return 200
    }

    /// Six concurrent inserts, each with its own session; the one that throws is rolled back.
    func concurrentQueries() async throws -> Int {
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
        return 200
    }

    /// Rolls back twice: through the connect and through the session.
    func earlyRollback() async throws -> Int {
        let session = try await connect.session()
        try await insert(session, "rolled back 1")
        try await connect.rollback()
        try await insert(session, "rolled back 2")
        try await session.rollback()
        return 200
    }

    /// Inserts, then throws: the middleware rolls back; 500.
    func autoRollbackByException() async throws -> Int {
        try await insert(connect.session(), "rolled back by exception")
        throw IntendedFailure()
    }

    /// Inserts, then answers 500: the middleware rolls back.
    func autoRollbackByStatusCode() async throws -> Int {
        try await insert(connect.session(), "rolled back by status")
        return 500
    }

    /// Commits in an atomic block, gives the connection back early, and later writes again.
    func earlyConnectionClose() async throws -> Int {
        try await connect.atomic { try await insert($0, "before close") }
        try await connect.closeSession()
        // ... long work that needs no connection would go here ...
        try await insert(connect.session(), "after close")
        return 200
    }
}
