/// What ``DBConnect/atomic(_:isolation:_:)`` does with a transaction that is already open.
public enum DBAtomicMode: Sendable, Hashable {
    /// Commit the open transaction first, then run the block in a fresh one. The default.
    case commit
    /// Roll the open transaction back first, then run the block in a fresh one.
    case rollback
    /// Join the open transaction; it commits (or rolls back on error) with the block.
    case append
    /// Throw ``DBError/Code/transactionAlreadyOpen``.
    case fail
}

extension DBConnect {
    // MARK: - The context session

    /// Commits the context session's open transaction, if any. Does nothing when there is no
    /// session or no transaction.
    /// - Throws: ``DBError/Code/noContext`` outside a context; ``DBError/Code/commitFailed`` or ``DBError/Code/commitOutcomeUnknown``.
    public func commit() async throws {
        try await existingSession()?.commit()
    }

    /// Rolls the context session's open transaction back, if any.
    /// - Throws: ``DBError/Code/noContext`` outside a context.
    public func rollback() async throws {
        try await existingSession()?.rollback()
    }

    /// Closes the context session and removes it from the context: its open transaction is
    /// rolled back and its connection goes back to the pool. The next ``session()`` is a new one.
    /// - Throws: ``DBError/Code/noContext`` outside a context.
    public func closeSession() async throws {
        let context = try requireContext()
        await context.remove(for: self)?.close()
    }

    /// Runs `body` in a transaction of the context session and commits it at the end.
    ///
    /// `mode` says what happens to a transaction that is already open (see ``DBAtomicMode``).
    /// When `body` throws, the transaction is rolled back and the error rethrown.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - mode: What to do with an open transaction. Default ``DBAtomicMode/commit``.
    ///   - body: The work, given the context session.
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws, ``DBError/Code/transactionAlreadyOpen`` in mode `.fail`,
    ///   or ``DBError/Code/commitFailed`` or ``DBError/Code/commitOutcomeUnknown``.
    public func atomic<R>(
        _ mode: DBAtomicMode = .commit,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (DBSession<Engine>) async throws -> R
    ) async throws -> R {
        let session = try await session()
        if session.isInTransaction {
            switch mode {
            case .commit: try await session.commit()
            case .rollback: try await session.rollback()
            case .append: break
            case .fail:
                throw DBError(
                    .transactionAlreadyOpen,
                    "atomic(.fail) found a transaction already open; commit or roll it back first, or use .commit, .rollback or .append",
                    connect: label, host: session.host
                )
            }
        }
        return try await Self.inTransaction(session, body)
    }

    // MARK: - Sessions outside the context

    /// Runs `body` with a new session that is not in the context, and closes it at the end.
    ///
    /// What `body` does not commit is rolled back. Use it for work that must not share the
    /// request's transaction, or to run queries concurrently.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: The work, given the session.
    /// - Returns: What `body` returns.
    /// > Warning: Do not keep the session after `body` returns; it is closed.
    public func withSession<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (DBSession<Engine>) async throws -> R
    ) async throws -> R {
        // In a transactional test even work outside the context stays in the test's savepoints.
        let session: DBSession<Engine>
        let context = DBContext.current
        if let pinned = context?.pinnedSession(for: self) {
            session = pinned
        } else {
            // Outside the context's map, but its commits still advance the request's
            // read-your-own-writes position, so the request's later replica reads see them.
            session = try await makeSession(for: context)
        }
        do {
            let result = try await body(session)
            await session.close()
            return result
        } catch {
            await session.close()
            throw error
        }
    }

    /// Runs `body` in a new session's transaction outside the context: commits when `body`
    /// returns, rolls back when it throws, closes the session either way.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: The work, given the session.
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws, or ``DBError/Code/commitFailed`` or ``DBError/Code/commitOutcomeUnknown``.
    public func withTransaction<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (DBSession<Engine>) async throws -> R
    ) async throws -> R {
        try await withSession { session in
            try await Self.inTransaction(session, body)
        }
    }

    /// Runs `body`, then commits; rolls back and rethrows when `body` or the commit fails.
    /// - Parameter isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    private static func inTransaction<R>(
        _ session: DBSession<Engine>,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (DBSession<Engine>) async throws -> R
    ) async throws -> R {
        do {
            let result = try await body(session)
            try await session.commit()
            return result
        } catch {
            try? await session.rollback()
            throw error
        }
    }
}
