import ContextDB

/// Runs `body` in a request context opened the way `DBSessionMiddleware` opens one; the
/// middleware then passes through, so requests the test sends in-process share its sessions.
///
/// - Parameters:
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - commits: `true` (the default): when `body` returns, open transactions are committed —
///     rolled back when it throws — and every session is closed, as the middleware would.
///     `false`: nothing is committed; at the end everything still open is rolled back and every
///     session closed, so no connection outlives the test.
///   - body: The test.
/// - Returns: What `body` returns.
public func withTestDBContext<R>(
    commits: Bool = true,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    if commits {
        return try await withDBContext(ifActive: .newContext, body)
    }
    let context = DBContext(nestedIn: DBContext.current)
    do {
        let result = try await context.run(body)
        await context.rollbackAll()
        await context.end()
        return result
    } catch {
        await context.rollbackAll()
        await context.end()
        throw error
    }
}

/// Where a transactional test sends the app's replica sessions.
public enum DBTestReplicaMode: Sendable, Hashable {
    /// The replica connects share the test's connection: the app's reads see the test's
    /// uncommitted data. Fast and convenient; a read that would need read-your-own-writes in
    /// production passes here.
    case shareTestConnection
    /// The replica connects keep real, separate, read-only connections: they do not see the
    /// test's uncommitted data, so a test catches a read that needed read-your-own-writes.
    case strict
}

/// Runs a fast transactional test: the app's transactions become savepoints on one connection
/// of the test's, and everything is rolled back at the end.
///
/// Inside `body` (and every context nested in it), `primary.session()` — and, with
/// ``DBTestReplicaMode/shareTestConnection``, every replica connect's session — is a savepoint
/// session on the test's connection: the app's `commit()` releases a savepoint, its `rollback()`
/// rolls back to one, `atomic` blocks and early `close` work as in production, only as
/// savepoints. Statements of concurrent requests are serialized on the connection. Requests
/// must run in-process in the test's task tree (Hummingbird: `app.test(.router)`); a request
/// served by a real server task sees no test context and uses real connections.
///
/// ```swift
/// try await withTransactionalTest(primary, replicas: [replica]) {
///     try await app.test(.router) { client in … }     // the app commits: savepoints only
///     let rows = try await primary.session().queryValue("SELECT count(*) FROM items", as: Int.self)
/// }                                                     // rolled back: the database is unchanged
/// ```
/// - Parameters:
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - primary: The connect whose engine lends the test's connection.
///   - replicas: Other connects of the app (replicas).
///   - replicaMode: Whether `replicas` share the test's connection. Default: they do.
///   - body: The test.
/// - Returns: What `body` returns.
public func withTransactionalTest<Engine, R>(
    _ primary: DBConnect<Engine>,
    replicas: [DBConnect<Engine>] = [],
    replicaMode: DBTestReplicaMode = .shareTestConnection,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    try await primary.withSession { test in
        try await test.withSavepointSessions(for: [primary] + (replicaMode == .strict ? [] : replicas), body)
    }
}

extension DBConnect {
    /// Runs `body` with a session for test fixtures whose work is always rolled back at the end —
    /// also what `body` commits: its commits are savepoint releases inside one transaction.
    ///
    /// The session is outside any context, and so is `body`'s work unless it opens one.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: The fixture work, given the session.
    /// - Returns: What `body` returns.
    public func withRollbackSession<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (DBSession<Engine>) async throws -> R
    ) async throws -> R {
        try await withSession { test in
            try await test.withSavepointSessions(for: [self]) {
                try await body(try await self.session())
            }
        }
    }
}
