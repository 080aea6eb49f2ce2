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
        /// Sessions pinned by `DBSession.withSavepointSessions`, inherited by nested contexts.
        var pinned: [ObjectIdentifier: Entry] = [:]
    }

    let state: Mutex<State>
    /// The read-your-own-writes position (``consistencyToken``), shared with this context's sessions.
    let consistency: DBConsistencyRecord

    /// Creates an empty context. Nothing is connected until a session runs a statement.
    ///
    /// Install it with ``run(isolation:_:)``; end it with ``finish(statusCode:beforeCommit:)``
    /// or ``commitAll(beforeCommit:)`` / ``rollbackAll()``, then ``end()``.
    public convenience init() {
        self.init(nestedIn: nil)
    }

    /// Creates an empty context nested in `parent`: it inherits the sessions a transactional
    /// test (`withTransactionalTest`) pinned there, so work in it stays in the test's
    /// savepoints. Framework integrations that make their own contexts pass
    /// `DBContext.current` here; ``withDBRequest(ifActive:consistencyToken:beforeCommit:statusCode:onCommitted:isolation:_:)``
    /// does.
    /// - Parameter parent: The context to nest in, or `nil` (the same as ``init()``).
    public init(nestedIn parent: DBContext?) {
        state = Mutex(State(pinned: parent?.state.withLock { $0.pinned } ?? [:]))
        consistency = DBConsistencyRecord(parent: parent?.consistency)
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

    /// Whether ``end()`` ran: no new session can be made in this context.
    public var isEnded: Bool { state.withLock { $0.finished } }

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
                if !existing.liveness.isClosed { return storedSession(existing.session, of: connect) }
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
            return storedSession(state.entries.remove(at: index).session, of: connect)
        }
    }

    private static func finishedError(_ label: String) -> DBError {
        DBError(
            .contextFinished,
            "the request context already ended and closed its sessions; a task that outlives its request must open its own context with withDBContext { }",
            connect: label
        )
    }
}

/// A session of the context's map, as the type of the connect it is stored for.
///
/// Sound: the map is written only by `insert(_:for:)` and `pin(_:for:)`, both generic over one
/// `Engine` for the session and the connect, under the key `ObjectIdentifier(connect)`; and a
/// connect's identifier cannot pass to another object while its session is in the map (the
/// session holds the connect). So the session stored under a `DBConnect<Engine>`'s identifier is
/// a `DBSession<Engine>`. Unchecked, because a checked cast costs a type-metadata lookup in code
/// that is not specialized for the engine.
func storedSession<Engine>(_ session: AnyObject, of connect: DBConnect<Engine>) -> DBSession<Engine> {
    unsafeDowncast(session, to: DBSession<Engine>.self)
}
