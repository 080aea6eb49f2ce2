/// What ``withDBContext(ifActive:beforeCommit:isolation:_:)`` does when a context is already active.
public enum DBContextNesting: Sendable {
    /// Open a new, separate context; the outer one is untouched. The default.
    case newContext
    /// Run in the active context and leave its ending to whoever opened it (middleware, tests).
    case join
    /// Throw ``DBError/Code/contextAlreadyActive``.
    case fail
}

/// Runs `body` in a new request context, then ends it.
///
/// When `body` returns, every open transaction is committed (each after `beforeCommit`); when it
/// throws, they are rolled back. Every session is closed either way, also on cancellation. Use it
/// for background jobs, for tests, and to run queries concurrently: each context has its own
/// sessions and so its own connections.
/// - Parameters:
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - ifActive: What to do when a context is already active. Default: open a new one.
///   - beforeCommit: Runs before each commit with the session about to commit.
///   - body: The work.
/// - Returns: What `body` returns.
/// - Throws: What `body` throws, a failed commit, or ``DBError/Code/contextAlreadyActive``.
public func withDBContext<R>(
    ifActive: DBContextNesting = .newContext,
    beforeCommit: (@Sendable (any AnyDBSession) async throws -> Void)? = nil,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    try await withDBRequest(ifActive: ifActive, beforeCommit: beforeCommit, statusCode: { _ in 200 }, body)
}

/// Runs one request the way a server middleware does: in a new context, committing when the
/// status `body`'s result maps to is below 400, rolling back at 400 and above or when `body`
/// throws, and always closing every session — before the caller gets the result.
///
/// Framework integrations (`DBSessionMiddleware`) are built on it; use it to write your own.
/// - Parameters:
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - ifActive: What to do when a context is already active. Default ``DBContextNesting/join``:
///     run in it and leave the ending to its owner (a test that installed one, say) — except in
///     a transactional test (`ContextDBTesting`), where the request gets a nested context so its
///     end is played out as savepoints.
///   - consistencyToken: The read-your-own-writes position the client sent back, if any
///     (``DBContext/consistencyToken``).
///   - beforeCommit: Runs before each commit with the session about to commit.
///   - statusCode: The HTTP status of `body`'s result.
///   - onCommitted: Runs after a successful commit (status below 400), with the context (its stored values still
///     readable) and the result to adjust — to set a response header, say.
///   - body: The request handler.
/// - Returns: What `body` returns, once its transactions are committed.
/// - Throws: What `body` throws, or what the commit throws — then nothing was reported as done.
///   A `DBError` carries ``DBError/requestCommittedWork``.
public func withDBRequest<R>(
    ifActive: DBContextNesting = .join,
    consistencyToken: String? = nil,
    beforeCommit: (@Sendable (any AnyDBSession) async throws -> Void)? = nil,
    statusCode: (R) -> Int,
    onCommitted: ((DBContext, inout R) -> Void)? = nil,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    let active = DBContext.current
    if let active {
        switch ifActive {
        case .newContext: break
        // A transactional test pins savepoint sessions: nest, so the request's end is played
        // out as savepoints exactly as it would be in production.
        case .join where active.hasPinnedSessions: break
        case .join: return try await body()
        case .fail:
            throw DBError(
                .contextAlreadyActive,
                "a request context is already active; use ifActive: .join to run in it or .newContext for a separate one"
            )
        }
    }
    let context = DBContext(nestedIn: active)
    context.consistencyToken = consistencyToken
    var result: R
    do {
        // beforeCommit runs inside the context too, so it can read and store context values.
        var committed = false
        result = try await context.run {
            let result = try await body()
            let status = statusCode(result)
            try await context.finish(statusCode: status, beforeCommit: beforeCommit)
            committed = status < 400
            return result
        }
        if committed { onCommitted?(context, &result) }
    } catch var error as DBError {
        error.requestCommittedWork = context.consistency.hasCommitted
        await context.rollbackAll()
        await context.end()
        throw error
    } catch {
        await context.rollbackAll()
        await context.end()
        throw error
    }
    await context.end()
    return result
}
