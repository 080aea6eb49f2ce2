import Synchronization

/// The request context: the map of sessions, one per ``DBConnect``, that a request shares.
///
/// A context lives in a task-local value. Child tasks (`async let`, task groups, `Task {}`)
/// see their parent's context and so the same sessions; `Task.detached` sees none. A new
/// context is only ever made explicitly, by ``withDBContext(ifActive:beforeCommit:isolation:_:)``,
/// by `DBSessionMiddleware`, or by ``run(isolation:_:)`` on a context you made yourself.
public final class DBContext: Sendable {
    @TaskLocal static var active: DBContext?

    /// The context of the current task, or `nil` when none is active.
    public static var current: DBContext? { active }

    struct Entry: Sendable {
        let key: ObjectIdentifier
        let session: any AnyDBSession
        let liveness: DBSessionLiveness

        init<Engine>(key: ObjectIdentifier, session: DBSession<Engine>) {
            self.key = key
            self.session = session
            self.liveness = session.liveness
        }
    }

    struct State: Sendable {
        var entries: [Entry] = []
        var finished = false
        var values: [ObjectIdentifier: any Sendable] = [:]
        var consistencyToken: String?
        /// Sessions pinned by `DBSession.withSavepointSessions`, inherited by nested contexts.
        var pinned: [ObjectIdentifier: Entry] = [:]
    }

    let state: Mutex<State>

    /// Creates an empty context. Nothing is connected until a session runs a statement.
    ///
    /// Install it with ``run(isolation:_:)``; end it with ``finish(statusCode:beforeCommit:)``
    /// or ``commitAll(beforeCommit:)`` / ``rollbackAll()``, then ``end()``.
    public init() {
        state = Mutex(State(pinned: DBContext.current?.state.withLock { $0.pinned } ?? [:]))
    }

    func pinnedSession<Engine>(for connect: DBConnect<Engine>) -> DBSession<Engine>? {
        state.withLock { state in
            state.pinned[ObjectIdentifier(connect)].map { unsafeDowncast($0.session, to: DBSession<Engine>.self) }
        }
    }

    var hasPinnedSessions: Bool { state.withLock { !$0.pinned.isEmpty } }

    func pin<Engine>(_ session: DBSession<Engine>, for connect: DBConnect<Engine>) {
        let key = ObjectIdentifier(connect)
        state.withLock { $0.pinned[key] = Entry(key: key, session: session) }
    }

    /// Runs `body` with this context as ``current``.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: The work; every session it asks for lives in this context.
    /// - Returns: What `body` returns.
    public func run<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> R
    ) async rethrows -> R {
        try await Self.$active.withValue(self, operation: body, isolation: isolation)
    }

    /// The sessions of this context in the order they were created.
    public var sessions: [any AnyDBSession] {
        state.withLock { $0.entries.map(\.session) }
    }

    /// A value stored in this context for the rest of the request, by key type.
    ///
    /// Use it to carry request-wide facts between the handler, `beforeCommit` and the
    /// middleware — a read-your-own-writes token, say:
    /// ```swift
    /// enum CommitLSN: DBContextKey { typealias Value = String }
    /// DBContext.current?[CommitLSN.self] = lsn
    /// ```
    public subscript<Key: DBContextKey>(_ key: Key.Type) -> Key.Value? {
        get { state.withLock { $0.values[ObjectIdentifier(key)] as? Key.Value } }
        set { state.withLock { $0.values[ObjectIdentifier(key)] = newValue } }
    }

    /// The position the request's reads must reflect — for PostgreSQL, the WAL LSN of the
    /// request's last committed write, or one the client echoed back (`X-WAL-LSN`).
    ///
    /// Engines that support read-your-own-writes advance it when a transaction that wrote
    /// commits; replica routing reads it; the middleware takes it from the request and returns
    /// it to the client. Opaque to the core.
    public var consistencyToken: String? {
        get { state.withLock { $0.consistencyToken } }
        set { state.withLock { $0.consistencyToken = newValue } }
    }

    /// Changes ``consistencyToken`` atomically, so concurrent commits in one request keep the
    /// newest position.
    /// - Parameter update: Given the current token, returns the new one.
    public func updateConsistencyToken(_ update: (String?) -> String?) {
        state.withLock { $0.consistencyToken = update($0.consistencyToken) }
    }

    /// Whether ``end()`` ran: no new session can be made in this context.
    public var isFinished: Bool { state.withLock { $0.finished } }

    // MARK: - Session map

    /// The live session of the connect with identity `key`, or `nil`. Not generic, so the lookup
    /// costs no type-metadata work: the caller (`DBConnect.session()`) knows the session's type.
    func liveSession(for key: ObjectIdentifier, label: String) throws -> AnyObject? {
        try state.withLock { state -> AnyObject? in
            if state.finished { throw Self.finishedError(label) }
            // An index loop, not `for … where`: no iterator, no copy of the entries.
            var index = state.entries.startIndex
            while index < state.entries.endIndex {
                if state.entries[index].key == key {
                    return state.entries[index].liveness.isClosed ? nil : state.entries[index].session
                }
                index += 1
            }
            if !state.pinned.isEmpty, let pinned = state.pinned[key] {
                // Recorded here too, so this context's commit, rollback and close reach it.
                state.entries.append(pinned)
                return pinned.session
            }
            return nil
        }
    }

    /// Stores `candidate` unless another task stored a live session for the same connect first;
    /// returns the one that is in the map.
    func insert<Engine>(_ candidate: DBSession<Engine>, for connect: DBConnect<Engine>) throws -> DBSession<Engine> {
        let key = ObjectIdentifier(connect)
        return try state.withLock { state in
            if state.finished { throw Self.finishedError(connect.label) }
            if let index = state.entries.firstIndex(where: { $0.key == key }) {
                let existing = state.entries[index]
                if !existing.liveness.isClosed { return unsafeDowncast(existing.session, to: DBSession<Engine>.self) }
                state.entries[index] = Entry(key: key, session: candidate)
            } else {
                state.entries.append(Entry(key: key, session: candidate))
            }
            return candidate
        }
    }

    func remove<Engine>(for connect: DBConnect<Engine>) -> DBSession<Engine>? {
        let key = ObjectIdentifier(connect)
        return state.withLock { state in
            guard let index = state.entries.firstIndex(where: { $0.key == key }) else { return nil }
            return unsafeDowncast(state.entries.remove(at: index).session, to: DBSession<Engine>.self)
        }
    }

    private static func finishedError(_ label: String) -> DBError {
        DBError(
            .contextFinished,
            "the request context already ended and closed its sessions; a task that outlives its request must open its own context with withDBContext { }",
            connect: label
        )
    }

    // MARK: - Ending the request

    /// Commits every session that has an open transaction, in creation order.
    ///
    /// `beforeCommit` runs for each such session just before its `COMMIT`; if it throws, that
    /// session is not committed. On the first failure the remaining open transactions are rolled
    /// back and the error is rethrown. Sessions committed before the failure stay committed.
    /// - Parameter beforeCommit: Runs before each commit with the session about to commit.
    /// - Throws: What `beforeCommit` threw, or a ``DBError`` with code ``DBError/Code/commitFailed``
    ///   (or ``DBError/Code/commitOutcomeUnknown`` when a `COMMIT`'s answer was lost).
    nonisolated(nonsending) public func commitAll(
        beforeCommit: (@Sendable (any AnyDBSession) async throws -> Void)? = nil
    ) async throws {
        for session in sessions where session.isInTransaction {
            do {
                if let beforeCommit { try await beforeCommit(session) }
                try await session.commit()
            } catch {
                await rollbackAll()
                throw error
            }
        }
    }

    /// Rolls back every open transaction. A connection whose rollback fails is closed, not pooled.
    nonisolated(nonsending) public func rollbackAll() async {
        for session in sessions where session.isInTransaction {
            try? await session.rollback()
        }
    }

    /// Closes every session: open transactions are rolled back, connections go back to their pool.
    /// The context stays usable; a later ``DBConnect/session()`` makes a new session.
    nonisolated(nonsending) public func closeAll() async {
        let closing = state.withLock { state in
            defer { state.entries.removeAll() }
            return state.entries.map(\.session)
        }
        for session in closing { await session.close() }
    }

    /// Commits when `statusCode` is below 400, rolls back otherwise — what the middleware does.
    /// - Parameters:
    ///   - statusCode: The HTTP status of the response.
    ///   - beforeCommit: Runs before each commit (see ``commitAll(beforeCommit:)``).
    /// - Throws: What ``commitAll(beforeCommit:)`` throws.
    nonisolated(nonsending) public func finish(
        statusCode: Int,
        beforeCommit: (@Sendable (any AnyDBSession) async throws -> Void)? = nil
    ) async throws {
        if statusCode < 400 {
            try await commitAll(beforeCommit: beforeCommit)
        } else {
            await rollbackAll()
        }
    }

    /// Ends the context: no new session can be made in it, and every session is closed.
    nonisolated(nonsending) public func end() async {
        state.withLock { $0.finished = true }
        await closeAll()
    }
}

/// A key for a value stored in a ``DBContext`` (see ``DBContext/subscript(_:)``).
public protocol DBContextKey {
    /// The type of the stored value.
    associatedtype Value: Sendable
}

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
public func withDBRequest<R>(
    ifActive: DBContextNesting = .join,
    consistencyToken: String? = nil,
    beforeCommit: (@Sendable (any AnyDBSession) async throws -> Void)? = nil,
    statusCode: (R) -> Int,
    onCommitted: ((DBContext, inout R) -> Void)? = nil,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    if let active = DBContext.current {
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
    let context = DBContext()
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
    } catch {
        await context.rollbackAll()
        await context.end()
        throw error
    }
    await context.end()
    return result
}
