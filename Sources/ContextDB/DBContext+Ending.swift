import Synchronization

extension DBContext {
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
