import Synchronization

extension DBSession {
    /// Runs `body` in a new context where every session of `connects` is a savepoint session on
    /// this session's connection — the heart of fast transactional tests.
    ///
    /// This session leases its connection and begins its transaction first. Inside `body`, and
    /// in every context nested in it, `connect.session()` for any of `connects` returns one
    /// shared session whose transactions are savepoints: `commit()` releases one, `rollback()`
    /// rolls back to it, `close()` rolls back to it and keeps the session usable. Statements of
    /// concurrent tasks are serialized on the connection, never interleaved. Nothing is
    /// committed: when this session's own transaction is rolled back (close it, or use
    /// `withSession`), everything `body` did is undone.
    ///
    /// Listing a replica connect points it at the same connection, so the app's replica reads
    /// see the test's uncommitted data — but they are then not read-only. Leave it out to keep
    /// it a real, separate read-only connection.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - connects: The connects whose sessions become savepoint sessions.
    ///   - body: The test.
    /// - Returns: What `body` returns.
    package func withSavepointSessions<R>(
        for connects: [DBConnect<Engine>],
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> R
    ) async throws -> R {
        try await withConnection { connection in
            let engine = state.withLock { $0.phase.lease.map(Self.lease) }!.engine
            let shared = DBSharedConnection(engine: engine, connection: connection, host: host)
            let context = DBContext(nestedIn: DBContext.current)
            for connect in connects {
                context.pin(DBSession(connect: connect, shared: shared, consistency: context.consistency), for: connect)
            }
            do {
                let result = try await context.run(body)
                await context.end()
                return result
            } catch {
                await context.end()
                throw error
            }
        }
    }
}

/// A connection lent to savepoint sessions: a FIFO lock serializes their statements, and a
/// counter names their savepoints.
final class DBSharedConnection<Engine: DatabaseEngine>: Sendable {
    let engine: Engine
    let connection: Engine.Connection
    let host: String

    private struct State {
        var locked = false
        var waiters: [CheckedContinuation<Void, Never>] = []
        var savepoints = 0
    }

    private let state = Mutex(State())

    init(engine: Engine, connection: Engine.Connection, host: String) {
        self.engine = engine
        self.connection = connection
        self.host = host
    }

    func lock() async {
        await withCheckedContinuation { continuation in
            let acquired = state.withLock { state in
                if state.locked {
                    state.waiters.append(continuation)
                    return false
                }
                state.locked = true
                return true
            }
            if acquired { continuation.resume() }
        }
    }

    func unlock() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if state.waiters.isEmpty {
                state.locked = false
                return nil
            }
            return state.waiters.removeFirst()  // the lock passes straight to the next waiter
        }
        next?.resume()
    }

    func nextSavepoint() -> String {
        state.withLock { state in
            state.savepoints += 1
            return "contextdb_sp_\(state.savepoints)"
        }
    }
}
