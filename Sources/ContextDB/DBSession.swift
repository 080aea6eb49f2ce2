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
    /// Told about each host whose lease failed, so routing can mark it suspect.
    let onLeaseFailure: (@Sendable (String, DBError) -> Void)?
    /// Pooled, or a savepoint session on a connection a transactional test lends.
    let mode: DBSessionMode<Engine>
    /// Where the positions of this session's commits go: the read-your-own-writes record of
    /// the context it was made for, if any.
    let consistency: DBConsistencyRecord?
    /// Why the host hook chose this session's host, for its transactions' spans.
    let routing: DBRoutingNote?

    typealias State = DBSessionState

    let state: Mutex<State>
    /// Whether the session closed, readable without knowing `Engine` (the context's lookup).
    let liveness = DBSessionLiveness()

    /// Whether the open transaction began `READ ONLY` because its connect prevents writes
    /// (``DBConnect/preventsWrites``): engines report a refused write as
    /// ``DBError/Code/writesPrevented`` then, not ``DBError/Code/readOnlySession``.
    package var transactionPreventsWrites: Bool { state.withLock { $0.writesPrevented } }

    init(
        connect: DBConnect<Engine>, candidates: [String], onLeaseFailure: (@Sendable (String, DBError) -> Void)? = nil,
        consistency: DBConsistencyRecord? = nil, routing: DBRoutingNote? = nil
    ) {
        precondition(!candidates.isEmpty, "a session needs a host")
        self.connect = connect
        self.consistency = consistency
        self.routing = routing
        self.onLeaseFailure = onLeaseFailure
        self.mode = .pooled
        self.state = Mutex(State(host: candidates[0], candidates: candidates))
    }

    /// A savepoint session on `shared`'s connection (see ``withSavepointSessions(for:isolation:_:)``).
    init(connect: DBConnect<Engine>, shared: DBSharedConnection<Engine>, consistency: DBConsistencyRecord?) {
        let lease = DBLease(
            shared.engine, shared.connection, instruments: connect.instruments(for: shared.host, engine: shared.engine)
        )
        self.connect = connect
        self.consistency = consistency
        self.routing = nil
        self.onLeaseFailure = nil
        self.mode = .savepoint(shared, lease: lease)
        self.state = Mutex(State(host: shared.host, candidates: [shared.host], everLeased: true, phase: .connected(lease)))
    }

    /// The host this session is bound to (see ``AnyDBSession/host``).
    public var host: String { state.withLock { $0.host } }

    public var connectLabel: String { connect.label }
    public var isInTransaction: Bool { state.withLock { $0.phase.hasTransaction } }
    public var hasConnection: Bool {
        guard mode.ownsConnection else { return true }  // the borrowed connection is always there
        return state.withLock { $0.phase.lease != nil }
    }

    /// A lease of this session, from its phase.
    ///
    /// Sound: the phase only ever holds `DBLease<Engine>` values of this session (it is
    /// written only by this class and its extensions, all generic over the same `Engine`).
    /// Unchecked, because a checked cast costs a type-metadata lookup.
    @inline(__always)
    static func lease(_ object: any AnyObject & Sendable) -> DBLease<Engine> {
        unsafeDowncast(object, to: DBLease<Engine>.self)
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
}
