import Synchronization

/// A session of any engine: what the request context and `beforeCommit` hooks see.
public protocol AnyDBSession: AnyObject, Sendable {
    /// The label of the ``DBConnect`` that made this session.
    var connectLabel: String { get }
    /// The host this session is bound to: chosen when it was created, or the fallback that
    /// served its first lease when the chosen one could not.
    var host: String { get }
    /// Whether a transaction is open (a statement ran since the last commit or rollback) — also
    /// one lost with its connection, which holds no connection until it is rolled back.
    var isInTransaction: Bool { get }
    /// Whether the session holds a leased connection.
    var hasConnection: Bool { get }
    /// Whether ``close()`` ran; a closed session refuses statements.
    var isClosed: Bool { get }
    /// Commits the open transaction, if any; keeps the connection.
    func commit() async throws
    /// Rolls the open transaction back, if any; keeps the connection.
    func rollback() async throws
    /// Rolls back anything open and gives the connection back. The session can't be used again.
    func close() async
}

/// Whether a session closed, as a non-generic object: the context's session lookup reads it
/// without casting the session back to its engine type (a cast costs a metadata lookup).
final class DBSessionLiveness: Sendable {
    private let closed = Atomic<Bool>(false)

    var isClosed: Bool { closed.load(ordering: .acquiring) }

    func close() { closed.store(true, ordering: .releasing) }
}

/// The mutable state of a ``DBSession``. Outside the generic class, so that reading it costs
/// no type-metadata lookup in the session's unspecialized code.
struct DBSessionState: Sendable {
    var host: String
    /// Whether a lease ever succeeded: failover to another host only happens before that.
    var everLeased = false
    /// The `DBLease<Engine>` while the session holds a connection.
    var lease: (any AnyObject & Sendable)?
    /// Whether a transaction is open — on the server, or lost with its connection (`lost`).
    var inTransaction = false
    /// The server closed the connection of the open transaction: its work is gone, and the
    /// session refuses statements until the transaction is rolled back (or the session closed).
    /// Boxed, so the state stays small and the hot paths test one pointer.
    var lost: DBLostTransaction?
    var busy = false
    /// `close()` ran while a statement was running: the running operation releases.
    var releaseWhenIdle = false
    /// The savepoint that stands for the open transaction of a savepoint session.
    var savepoint: String?

    /// Forgets the open transaction (committed, rolled back, or lost with its connection).
    mutating func endTransaction() {
        inTransaction = false
        lost = nil
    }
}

/// Why a session's open transaction was lost (see `DBSessionState.lost`).
final class DBLostTransaction: Sendable {
    let error: DBError

    init(_ error: DBError) { self.error = error }
}

/// A session's engine and leased connection, boxed: the session's state then has no generic
/// field, so the session's code (not specialized for the caller's engine) reads it without
/// type-metadata lookups.
final class DBLease<Engine: DatabaseEngine>: Sendable {
    let engine: Engine
    let connection: Engine.Connection

    init(_ engine: Engine, _ connection: Engine.Connection) {
        self.engine = engine
        self.connection = connection
    }
}

/// A lazy database session bound to one host of a ``DBConnect``.
///
/// No connection is leased until the first statement; the first statement also begins a
/// transaction (autobegin). ``commit()`` and ``rollback()`` end the transaction and keep the
/// connection for the next one; ``close()`` rolls back what is open and returns the connection.
///
/// A session is used by one task at a time. A second task that runs a statement while one is
/// running gets ``DBError/Code/sessionBusy``; statements are never interleaved. To run queries
/// concurrently give each task its own session (``withDBContext(ifActive:beforeCommit:isolation:_:)``
/// or ``DBConnect/withSession(isolation:_:)``).
public final class DBSession<Engine: DatabaseEngine>: AnyDBSession {
    /// The connect that made this session.
    public let connect: DBConnect<Engine>
    /// The hosts to try, in order, for the first lease; the first is the chosen one.
    let candidates: [String]
    /// Told about each host whose lease failed, so routing can mark it suspect.
    let onLeaseFailure: (@Sendable (String, DBError) -> Void)?
    /// Set for a savepoint session: it runs on this borrowed connection, and its transactions
    /// are savepoints inside the connection's own transaction.
    let shared: DBSharedConnection<Engine>?

    typealias State = DBSessionState

    let state: Mutex<State>
    /// Whether the session closed, readable without knowing `Engine` (the context's lookup).
    let liveness = DBSessionLiveness()

    init(connect: DBConnect<Engine>, candidates: [String], onLeaseFailure: (@Sendable (String, DBError) -> Void)? = nil) {
        precondition(!candidates.isEmpty, "a session needs a host")
        self.connect = connect
        self.candidates = candidates
        self.onLeaseFailure = onLeaseFailure
        self.shared = nil
        self.state = Mutex(State(host: candidates[0]))
    }

    /// A savepoint session on `shared`'s connection (see ``withSavepointSessions(for:isolation:_:)``).
    init(connect: DBConnect<Engine>, shared: DBSharedConnection<Engine>) {
        self.connect = connect
        self.candidates = [shared.host]
        self.onLeaseFailure = nil
        self.shared = shared
        var state = State(host: shared.host)
        state.lease = DBLease(shared.engine, shared.connection)
        state.everLeased = true
        self.state = Mutex(state)
    }

    /// The host this session is bound to (see ``AnyDBSession/host``).
    public var host: String { state.withLock { $0.host } }

    public var connectLabel: String { connect.label }
    public var isInTransaction: Bool { state.withLock { $0.inTransaction } }
    public var hasConnection: Bool { state.withLock { $0.lease != nil } }

    /// The session's lease, read under the state's lock.
    @inline(__always)
    static func currentLease(_ state: borrowing State) -> DBLease<Engine>? {
        guard let lease = state.lease else { return nil }
        return unsafeDowncast(lease, to: DBLease<Engine>.self)
    }
    public var isClosed: Bool { liveness.isClosed }

    // MARK: - Running statements

    /// Runs `body` with this session's connection inside its transaction.
    ///
    /// Leases a connection on first use and begins a transaction when none is open.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: Work on the connection. It must not keep the connection.
    /// - Returns: What `body` returns.
    /// - Throws: ``DBError/Code/sessionBusy`` when another task is using the session,
    ///   ``DBError/Code/sessionClosed`` after ``close()``, ``DBError/Code/connectionLost`` when the
    ///   connection of the open transaction was lost (until the session is rolled back), a lease
    ///   or `BEGIN` failure, or what `body` throws.
    ///
    /// > Warning: The connection belongs to the session: do not use it after `body` returns.
    /// > Statements sent on it directly bypass the engine's guards (a statement timeout, the
    /// > fast failure on a connection the server closed): prefer the engine module's query
    /// > functions, or `withLeasedConnection(isolation:_:)` and the engine's own.
    public func withConnection<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (Engine.Connection) async throws -> R
    ) async throws -> R {
        // Written out, not through withLeasedConnection: one closure and frame less per call.
        try await enter()
        do {
            let lease = try await prepare().lease
            let result = try await body(lease.connection)
            await leave()
            return result
        } catch {
            await failed(after: error)
            throw error
        }
    }

    /// Runs `body` with this session's engine and connection inside its transaction — for
    /// engine modules, whose query functions run statements through their engine.
    ///
    /// Behaves as ``withConnection(isolation:_:)``. When `body` throws and the engine reports the
    /// connection unusable (``DatabaseEngine/isConnectionUsable(_:)``), the session discards it
    /// (it is never pooled) and, if a transaction was open, remembers it as lost.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: Work on the connection. It must not keep the connection.
    /// - Returns: What `body` returns.
    /// - Throws: See ``withConnection(isolation:_:)``.
    public func withLeasedConnection<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (Engine, Engine.Connection) async throws -> R
    ) async throws -> R {
        try await enter()
        do {
            let lease = try await prepare().lease
            let result = try await body(lease.engine, lease.connection)
            await leave()
            return result
        } catch {
            await failed(after: error)
            throw error
        }
    }

    /// Runs `body` with this session's engine and connection inside its transaction, telling it
    /// whether this call began the transaction: `true` when `BEGIN` ran just before `body`, so
    /// nothing of the transaction ran yet — an engine module may then restart the transaction
    /// to retry a statement that failed for a reason a new transaction fixes.
    ///
    /// Behaves as `withLeasedConnection(isolation:_:)` otherwise. In a transactional test (the
    /// session's transaction is a savepoint), `beganTransaction` is `false`.
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: Work on the connection, given the engine, the connection and whether
    ///     this call began the transaction. It must not keep the connection.
    /// - Returns: What `body` returns.
    /// - Throws: See ``withConnection(isolation:_:)``.
    public func withLeasedConnection<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (Engine, Engine.Connection, _ beganTransaction: Bool) async throws -> R
    ) async throws -> R {
        try await enter()
        do {
            let (lease, began) = try await prepare()
            let result = try await body(lease.engine, lease.connection, began)
            await leave()
            return result
        } catch {
            await failed(after: error)
            throw error
        }
    }

    /// After a statement failed: discards a dead connection, then leaves.
    nonisolated(nonsending) private func failed(after error: any Error) async {
        await discardIfUnusable(after: error)
        await leave()
    }

    /// After a failure: when the connection is dead, discard it.
    nonisolated(nonsending) private func discardIfUnusable(after error: any Error) async {
        guard let lease = state.withLock({ Self.currentLease($0) }), Self.isLost(lease, after: error) else { return }
        await connectionLost(lostError(error))
    }

    /// Whether `error` left the lease's connection dead: the engine says so, or (for an engine
    /// that cannot tell) the error is ``DBError/Code/connectionLost``.
    private static func isLost(_ lease: DBLease<Engine>, after error: any Error) -> Bool {
        (error as? DBError)?.code == .connectionLost || !lease.engine.isConnectionUsable(lease.connection)
    }

    /// The error a lost transaction is remembered by.
    private func lostError(_ error: any Error) -> DBError {
        if let error = error as? DBError, error.code == .connectionLost || error.code == .statementTimeout { return error }
        return DBError(.connectionLost, "the connection closed", connect: connect.label, host: host, underlying: error)
    }

    /// Leases a connection if needed and begins a transaction if none is open. Runs inside
    /// `enter()`. `began` is whether this call sent `BEGIN` (not a test's savepoint).
    nonisolated(nonsending) private func prepare() async throws -> (lease: DBLease<Engine>, began: Bool) {
        let (lease, inTransaction, isLost) = state.withLock { (Self.currentLease($0), $0.inTransaction, $0.lost != nil) }
        if isLost, let lost = state.withLock({ $0.lost?.error }) {
            throw DBError(
                .connectionLost,
                "the connection of this session's open transaction was lost (\(lost.message)); its work is gone: roll back (or let the request end) and retry the transaction",
                connect: connect.label, host: lost.host ?? host, underlying: lost
            )
        }
        guard let lease else { return (try await acquire(), shared == nil) }
        guard !inTransaction else { return (lease, false) }
        do {
            try await begin(lease)
        } catch let error as DBError where error.code == .connectionLost && shared == nil {
            // Closed before BEGIN was sent, and no transaction was open on it: a fresh
            // connection to the same host serves.
            return (try await acquire(), true)
        }
        return (lease, shared == nil)
    }

    /// Sends `BEGIN`; on failure the connection, in an unknown state, is closed rather than pooled.
    nonisolated(nonsending) private func begin(_ lease: DBLease<Engine>) async throws {
        do {
            if let shared {
                let name = shared.nextSavepoint()
                try await lease.engine.execute(.savepoint(name), on: lease.connection)
                state.withLock {
                    $0.inTransaction = true
                    $0.savepoint = name
                }
                return
            }
            try await lease.engine.execute(.begin(connect.options), on: lease.connection)
            state.withLock { $0.inTransaction = true }
        } catch {
            if shared != nil { throw error }  // the borrowed connection is not ours to close
            state.withLock { $0.lease = nil }
            await lease.engine.releaseConnection(lease.connection, reusable: false)
            throw error
        }
    }

    /// Leases a connection and begins a transaction. Until the session has had a connection, a
    /// host that fails either step is reported and the next candidate tried, so a host that went
    /// down costs no failed request while another can serve. A pooled connection the server had
    /// already closed (``DBError/Code/connectionLost`` at `BEGIN`) is replaced once on the same
    /// host: nothing ran on it.
    nonisolated(nonsending) private func acquire() async throws -> DBLease<Engine> {
        let (current, everLeased) = state.withLock { ($0.host, $0.everLeased) }
        let hosts = everLeased ? [current] : Array(candidates.drop { $0 != current })
        var failures: [(host: String, error: any Error)] = []
        for host in hosts {
            var attempt = 0
            while true {
                attempt += 1
                do {
                    return try await lease(on: host)
                } catch is CancellationError {
                    throw CancellationError()
                } catch let error as DBError where error.code == .connectionLost && attempt == 1 {
                    continue
                } catch {
                    let failure = error as? DBError ?? DBError(
                        .connectionFailed, "BEGIN failed on a new connection", connect: connect.label, host: host, underlying: error
                    )
                    onLeaseFailure?(host, failure)
                    failures.append((host, error))
                    break
                }
            }
        }
        if failures.count == 1 { throw failures[0].error }
        throw DBError(
            .connectionFailed,
            "no host could serve the session; tried " + failures.map { failure in
                "\(failure.host) (\((failure.error as? DBError)?.message ?? "\(failure.error)"))"
            }.joined(separator: ", "),
            connect: connect.label, host: hosts.joined(separator: ","), underlying: failures.last?.error
        )
    }

    /// Leases a connection on `host` and begins a transaction on it.
    nonisolated(nonsending) private func lease(on host: String) async throws -> DBLease<Engine> {
        let engine: Engine
        let connection: Engine.Connection
        do {
            engine = try await connect.engine(for: host)
            connection = try await engine.leaseConnection()
        } catch let error as DBError {
            throw error
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            throw DBError(
                .connectionFailed,
                "could not lease a connection; check that the server is up and the credentials are right",
                connect: connect.label, host: host, underlying: error
            )
        }
        let lease = DBLease(engine, connection)
        state.withLock {
            $0.host = host
            $0.lease = lease
        }
        try await begin(lease)
        state.withLock { $0.everLeased = true }
        return lease
    }

    /// The server closed the connection: it is discarded, never pooled; an open transaction is
    /// remembered as lost, so no later statement runs outside it as if nothing happened.
    nonisolated(nonsending) private func connectionLost(_ error: DBError) async {
        let lease = state.withLock { state -> DBLease<Engine>? in
            if state.inTransaction, state.lost == nil { state.lost = DBLostTransaction(error) }
            guard shared == nil else { return nil }  // the borrowed connection is not ours to close
            defer { state.lease = nil }
            return Self.currentLease(state)
        }
        if let lease { await lease.engine.releaseConnection(lease.connection, reusable: false) }
    }

    nonisolated(nonsending) private func enter() async throws {
        if let shared {
            // Savepoint sessions share one connection: wait for it instead of failing, so
            // concurrent requests in a test are serialized, never interleaved.
            if isClosed { try state.withLock { try Self.closedError(connect.label, $0.host) } }
            await shared.lock()
            state.withLock { $0.busy = true }
            return
        }
        try state.withLock { state in
            // Set under this lock by close(), so reading it here is ordered with it.
            if liveness.isClosed { try Self.closedError(connect.label, state.host) }
            if state.busy {
                throw DBError(
                    .sessionBusy,
                    "the session is already running a statement in another task; a session serves one task at a time, so give concurrent work its own context (withDBContext) or session (withSession)",
                    connect: connect.label, host: state.host
                )
            }
            state.busy = true
        }
    }

    private static func closedError(_ label: String, _ host: String) throws {
        throw DBError(.sessionClosed, "this session was closed; ask the connect for a new one with session()", connect: label, host: host)
    }

    nonisolated(nonsending) private func leave() async {
        if let shared {
            state.withLock { $0.busy = false }
            shared.unlock()
            return
        }
        let release = state.withLock { state -> DBLease<Engine>? in
            state.busy = false
            guard state.releaseWhenIdle else { return nil }
            state.releaseWhenIdle = false
            guard let lease = Self.currentLease(state) else {
                state.endTransaction()  // closed while its connection was lost: nothing to release
                return nil
            }
            return lease
        }
        if let release { await finalRelease(release) }
    }

    // MARK: - Ending transactions

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
        let (lease, inTransaction, isLost) = state.withLock { (Self.currentLease($0), $0.inTransaction, $0.lost != nil) }
        guard inTransaction else { return await leave() }
        guard !isLost, let lease else {
            let lost = state.withLock { state in
                defer { state.endTransaction() }
                return state.lost?.error
            }
            await leave()
            throw DBError(
                .commitFailed,
                "the connection of this transaction was lost before COMMIT (\(lost?.message ?? "no connection")); the server rolled it back, nothing of it was saved",
                connect: connect.label, host: host, underlying: lost
            )
        }
        do {
            try await lease.engine.execute(commitStatement, on: lease.connection)
            state.withLock { $0.endTransaction() }
            await leave()
        } catch let error as DBError where error.code == .commitFailed {
            // The server ended the transaction without committing it: nothing to roll back.
            state.withLock { $0.endTransaction() }
            await leave()
            throw DBError(.commitFailed, error.message, connect: connect.label, host: host, underlying: error.underlying)
        } catch let error as DBError where error.code == .commitOutcomeUnknown || Self.isLost(lease, after: error) {
            await connectionLost(error)
            state.withLock { $0.endTransaction() }
            await leave()
            if error.code == .commitOutcomeUnknown {
                throw DBError(.commitOutcomeUnknown, error.message, connect: connect.label, host: host, underlying: error.underlying)
            }
            throw DBError(
                .commitFailed,
                "the connection was lost before the transaction could end (\(error.message)); the server rolled it back, nothing of it was saved",
                connect: connect.label, host: host, underlying: error
            )
        } catch {
            // A failed COMMIT ends the transaction on the server; make sure with a ROLLBACK.
            await discardTransaction(lease)
            await leave()
            throw DBError(
                .commitFailed,
                "COMMIT failed and the transaction was rolled back; nothing of it was saved",
                connect: connect.label, host: host, underlying: error
            )
        }
    }

    /// Rolls the open transaction back, if any, and keeps the connection for the next one.
    ///
    /// A transaction lost with its connection is already rolled back by the server: this only
    /// forgets it. If `ROLLBACK` itself fails the connection is closed instead of pooled, then
    /// the error is thrown.
    nonisolated(nonsending) public func rollback() async throws {
        try await enter()
        let (lease, inTransaction, lost) = state.withLock { (Self.currentLease($0), $0.inTransaction, $0.lost != nil) }
        guard inTransaction else { return await leave() }
        guard !lost, let lease else {
            state.withLock { $0.endTransaction() }
            return await leave()
        }
        do {
            try await runRollback(lease)
            state.withLock { $0.endTransaction() }
            await leave()
        } catch where Self.isLost(lease, after: error) {
            // The server rolls back the transaction of a connection that ends.
            await connectionLost(lostError(error))
            state.withLock { $0.endTransaction() }
            await leave()
        } catch {
            await dropConnection(lease)
            await leave()
            throw error
        }
    }

    /// Rolls back anything open and gives the connection back to the pool.
    ///
    /// The session refuses statements afterwards. When another task is running a statement on it,
    /// the connection is given back as soon as that statement ends.
    nonisolated(nonsending) public func close() async {
        if let shared {
            // A savepoint session is shared by the whole test: closing rolls back to its
            // savepoint and leaves it usable; the borrowed connection stays with its owner.
            await shared.lock()
            if let lease = openTransaction() {
                do { try await runRollback(lease) } catch { state.withLock { $0.endTransaction() } }
            } else {
                state.withLock { $0.endTransaction() }  // a transaction lost with the connection
            }
            shared.unlock()
            return
        }
        let action = state.withLock { state -> DBLease<Engine>? in
            liveness.close()
            if state.busy {
                state.releaseWhenIdle = true
                return nil
            }
            guard let lease = Self.currentLease(state) else {
                state.endTransaction()  // a transaction lost with its connection: nothing to release
                return nil
            }
            state.busy = true
            return lease
        }
        guard let lease = action else { return }
        await finalRelease(lease)
        state.withLock { $0.busy = false }
    }

    private func openTransaction() -> DBLease<Engine>? {
        state.withLock { state in
            guard state.inTransaction, state.lost == nil else { return nil }
            return Self.currentLease(state)
        }
    }

    /// Rolls back if needed, then releases. A connection whose rollback failed is not pooled.
    nonisolated(nonsending) private func finalRelease(_ lease: DBLease<Engine>) async {
        let inTransaction = state.withLock { state in
            defer {
                state.lease = nil
                state.endTransaction()
            }
            return state.inTransaction
        }
        var reusable = true
        if inTransaction {
            do { try await lease.engine.execute(.rollback, on: lease.connection) } catch { reusable = false }
        }
        await lease.engine.releaseConnection(lease.connection, reusable: reusable)
    }

    /// Rolls the server transaction back after a failure; drops the connection if that fails too.
    nonisolated(nonsending) private func discardTransaction(_ lease: DBLease<Engine>) async {
        do {
            try await runRollback(lease)
            state.withLock { $0.endTransaction() }
        } catch {
            await dropConnection(lease)
        }
    }

    /// `COMMIT`, or for a savepoint session `RELEASE SAVEPOINT`.
    private var commitStatement: DBControlStatement {
        guard shared != nil, let name = state.withLock({ $0.savepoint }) else { return .commit }
        return .releaseSavepoint(name)
    }

    /// `ROLLBACK`, or for a savepoint session `ROLLBACK TO SAVEPOINT` then `RELEASE SAVEPOINT`.
    nonisolated(nonsending) private func runRollback(_ lease: DBLease<Engine>) async throws {
        guard shared != nil, let name = state.withLock({ $0.savepoint }) else {
            return try await lease.engine.execute(.rollback, on: lease.connection)
        }
        try await lease.engine.execute(.rollbackToSavepoint(name), on: lease.connection)
        try await lease.engine.execute(.releaseSavepoint(name), on: lease.connection)
    }

    nonisolated(nonsending) private func dropConnection(_ lease: DBLease<Engine>) async {
        if shared != nil {
            state.withLock { $0.endTransaction() }
            return
        }
        state.withLock {
            $0.lease = nil
            $0.endTransaction()
        }
        await lease.engine.releaseConnection(lease.connection, reusable: false)
    }
}
