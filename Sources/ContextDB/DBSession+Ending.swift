import Synchronization

/// Ending transactions and the session: written once for pooled and savepoint sessions, with
/// the statements and the connection's ownership from `mode`.
extension DBSession {
    /// Commits the open transaction, if any, and keeps the connection for the next one.
    ///
    /// Whether the transaction committed is the server's answer, not a count of failed
    /// statements: a transaction recovered with `ROLLBACK TO SAVEPOINT` commits; one the server
    /// aborted is answered with a rollback (PostgreSQL's `COMMIT` then returns the tag
    /// `ROLLBACK`), which is reported as ``DBError/Code/commitFailed``.
    /// - Throws: ``DBError/Code/commitFailed`` when the transaction did not commit: the server
    ///   rolled it back, `COMMIT` failed, or the connection was lost before `COMMIT` was sent.
    ///   ``DBError/Code/commitOutcomeUnknown`` when `COMMIT` was sent and the connection was lost
    ///   before its answer: it may have committed.
    nonisolated(nonsending) public func commit() async throws {
        try await enter()
        switch state.withLock({ $0.phase }) {
        case .idle, .connected:
            await leave()
        case .lost(let lost):
            endTransaction(.commitFailed, error: lost.error)
            await leave()
            throw DBError(
                .commitFailed,
                "the connection of this transaction was lost before COMMIT (\(lost.error.message)); the server rolled it back, nothing of it was saved",
                connect: connect.label, host: host, underlying: lost.error
            )
        case .inTransaction(let lease, let savepoint):
            let lease = Self.lease(lease)
            do {
                let result = try await execute(mode.commit(savepoint: savepoint), on: lease)
                if let token = result.consistencyToken { consistency?.advance(to: token, latest: Engine.latestConsistencyToken) }
                consistency?.noteCommit()
                endTransaction(.commit)
                await leave()
            } catch let error as DBError where error.code == .commitFailed {
                // The server ended the transaction without committing it: nothing to roll back.
                endTransaction(.commitFailed, error: error)
                await leave()
                throw DBError(.commitFailed, error.message, connect: connect.label, host: host, underlying: error.underlying)
            } catch let error as DBError where error.code == .commitOutcomeUnknown || Self.isLost(lease, after: error) {
                await connectionLost(error)
                endTransaction(error.code == .commitOutcomeUnknown ? .commitUnknown : .commitFailed, error: error)
                await leave()
                if error.code == .commitOutcomeUnknown {
                    throw DBError(.commitOutcomeUnknown, error.message, connect: connect.label, host: host, underlying: error.underlying)
                }
                throw DBError(
                    .commitFailed,
                    "the connection was lost before the transaction could end (\(error.message)); the server rolled it back, nothing of it was saved",
                    connect: connect.label, host: host, underlying: lostError(error)
                )
            } catch {
                // A failed COMMIT ends the transaction on the server; make sure with a ROLLBACK.
                do {
                    try await runRollback(lease, savepoint: savepoint)
                    endTransaction(.commitFailed, error: error)
                } catch {
                    await dropConnection(lease, .commitFailed, error: error)
                }
                await leave()
                throw DBError(
                    .commitFailed,
                    "COMMIT failed and the transaction was rolled back; nothing of it was saved",
                    connect: connect.label, host: host, underlying: error
                )
            }
        }
    }

    /// Rolls the open transaction back, if any, and keeps the connection for the next one.
    ///
    /// A transaction lost with its connection is already rolled back by the server: this only
    /// forgets it. If `ROLLBACK` itself fails the connection is closed instead of pooled, then
    /// the error is thrown.
    nonisolated(nonsending) public func rollback() async throws {
        try await enter()
        switch state.withLock({ $0.phase }) {
        case .idle, .connected:
            await leave()
        case .lost:
            endTransaction(.rollback)
            await leave()
        case .inTransaction(let lease, let savepoint):
            let lease = Self.lease(lease)
            do {
                try await runRollback(lease, savepoint: savepoint)
                endTransaction(.rollback)
                await leave()
            } catch where Self.isLost(lease, after: error) {
                // The server rolls back the transaction of a connection that ends.
                await connectionLost(lostError(error))
                endTransaction(.rollback)
                await leave()
            } catch {
                await dropConnection(lease, .rollback, error: error)
                await leave()
                throw error
            }
        }
    }

    /// Rolls back anything open and gives the connection back to the pool.
    ///
    /// The session refuses statements afterwards. When another task is running a statement on it,
    /// the connection is given back as soon as that statement ends. In a transactional test
    /// (a savepoint session) it rolls back to the session's savepoint and the session stays
    /// usable: it is shared by the whole test.
    nonisolated(nonsending) public func close() async {
        guard mode.ownsConnection else {
            try? await rollback()  // a failed rollback already forgot the transaction
            return
        }
        let (lease, lostEnded) = state.withLock { state -> (DBLease<Engine>?, Bool) in
            liveness.close()
            if state.busy {
                state.releaseWhenIdle = true
                return (nil, false)
            }
            guard let lease = state.phase.lease else {
                // A transaction lost with its connection: nothing to release, the server rolled back.
                defer { state.phase = .idle }
                return (nil, state.phase.hasTransaction)
            }
            state.busy = true
            return (Self.lease(lease), false)
        }
        if lostEnded { transactionEnded(.rollback) }
        guard let lease else { return }
        await finalRelease(lease)
        state.withLock { $0.busy = false }
    }

    /// For engine modules' safe read retries: after the first statement of a transaction of a
    /// read-only connect failed in a way another host may not (a lost connection, a recovery
    /// conflict on a standby) — and before any row reached the caller —, ends the transaction,
    /// gives the connection back, and points the session at its next candidate host (the next
    /// fit replica, then the primary). Counts a failover (``DBMetricName/failovers``).
    ///
    /// The caller runs the statement again, once; nothing else is ever retried.
    /// - Parameters:
    ///   - error: Why the statement failed.
    ///   - hostIsSuspect: Tell the host hook the host failed (`onLeaseFailure`), so routing avoids
    ///     it until its next good probe: for a lost connection, not for a recovery conflict.
    /// - Returns: Whether the session moved: `false` for a session that may write, a test's
    ///   savepoint session, or one with no host left.
    package nonisolated(nonsending) func moveToNextHost(after error: DBError, hostIsSuspect: Bool) async -> Bool {
        guard mode.ownsConnection, connect.options.readOnly else { return false }
        let (current, candidates) = state.withLock { ($0.host, $0.candidates) }
        guard let index = candidates.firstIndex(of: current), index + 1 < candidates.count else { return false }
        try? await rollback()  // a lost transaction is forgotten; a live one (aborted) rolled back
        let lease = state.withLock { state -> DBLease<Engine>? in
            guard !state.busy, case .connected(let lease) = state.phase else { return nil }
            state.phase = .idle
            return Self.lease(lease)
        }
        if let lease { await lease.release(reusable: true) }
        let moved = state.withLock { state -> Bool in
            guard !state.busy, !state.phase.hasTransaction, state.phase.lease == nil else { return false }
            state.host = candidates[index + 1]
            state.everLeased = false
            return true
        }
        guard moved else { return false }
        if hostIsSuspect { onLeaseFailure?(current, error) }
        connect.countFailover(from: current)
        return true
    }

    /// Rolls back if needed, then releases. A connection whose rollback failed is not pooled.
    nonisolated(nonsending) func finalRelease(_ lease: DBLease<Engine>) async {
        let inTransaction = state.withLock { state in
            defer { state.phase = .idle }
            return state.phase.hasTransaction
        }
        var reusable = true
        if inTransaction {
            do { try await execute(.rollback, on: lease) } catch { reusable = false }
            transactionEnded(.rollback)
        }
        await lease.release(reusable: reusable)
    }

    /// Forgets the open transaction (committed, rolled back, or lost with its connection), and
    /// counts and ends its span with `outcome`.
    private func endTransaction(_ outcome: DBTransactionOutcome, error: (any Error)? = nil) {
        state.withLock { $0.phase = mode.phase(afterEnding: $0.phase) }
        transactionEnded(outcome, error: error)
    }

    /// Runs the mode's rollback statements.
    nonisolated(nonsending) private func runRollback(_ lease: DBLease<Engine>, savepoint: String?) async throws {
        for statement in mode.rollback(savepoint: savepoint) {
            try await execute(statement, on: lease)
        }
    }

    /// After a rollback failed: the transaction is forgotten and an owned connection, in an
    /// unknown state, is closed instead of pooled.
    nonisolated(nonsending) private func dropConnection(
        _ lease: DBLease<Engine>, _ outcome: DBTransactionOutcome, error: any Error
    ) async {
        guard mode.ownsConnection else { return endTransaction(outcome, error: error) }
        state.withLock { $0.phase = .idle }
        transactionEnded(outcome, error: error)
        await lease.release(reusable: false)
    }
}
