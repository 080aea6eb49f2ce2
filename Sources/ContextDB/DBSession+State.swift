import Synchronization
import Tracing

// A session's state, as types outside the generic `DBSession`: reading them costs no
// type-metadata lookup in the session's unspecialized code.

/// Where a session's transaction stands. One value, so no two facts can contradict each other.
enum DBSessionPhase: Sendable {
    /// No connection: never leased, or given back.
    case idle
    /// A connection (a `DBLease<Engine>`), no open transaction.
    case connected(any AnyObject & Sendable)
    /// A connection and its open transaction; for a savepoint session, the savepoint that
    /// stands for it.
    case inTransaction(any AnyObject & Sendable, savepoint: String?)
    /// The server closed the connection of the open transaction: its work is gone, and the
    /// session refuses statements until the transaction is rolled back (or the session closed).
    /// A pooled session holds no connection in this phase.
    case lost(DBLostTransaction)

    /// The lease of the phases that hold one.
    var lease: (any AnyObject & Sendable)? {
        switch self {
        case .connected(let lease), .inTransaction(let lease, _): return lease
        case .idle, .lost: return nil
        }
    }

    /// Whether a transaction is open — on the server, or lost with its connection.
    var hasTransaction: Bool {
        switch self {
        case .inTransaction, .lost: return true
        case .idle, .connected: return false
        }
    }
}

/// The mutable state of a ``DBSession``.
struct DBSessionState: Sendable {
    var host: String
    /// The hosts the session may try, the chosen one first: the host hook's choice and its
    /// fallbacks, or its second choice after all of those refused the session's first lease.
    var candidates: [String]
    /// Whether a lease ever succeeded: failover to another host only happens before that.
    var everLeased = false
    var phase = DBSessionPhase.idle
    /// A task is running an operation on the session.
    var busy = false
    /// `close()` ran while a statement was running: the running operation releases.
    var releaseWhenIdle = false
    /// The open transaction's span and metrics, from `BEGIN` until the session learns how it
    /// ended (also while it is `lost`).
    var trace: DBTransactionTrace?
    /// The open transaction began `READ ONLY` because the connect prevents writes.
    var writesPrevented = false
}

/// The span and metrics of one open transaction.
final class DBTransactionTrace: Sendable {
    /// `nil` when no tracer is set up.
    let span: (any Span)?
    let instruments: DBHostInstruments

    init(span: (any Span)?, instruments: DBHostInstruments) {
        self.span = span
        self.instruments = instruments
    }

    /// Counts the transaction and ends its span.
    func finish(_ outcome: DBTransactionOutcome, error: (any Error)? = nil) {
        instruments.count(outcome)
        guard let span else { return }
        guard span.isRecording else { return span.end() }
        span.attributes["contextdb.transaction.outcome"] = outcome.rawValue
        if let error { DBHostInstruments.fail(span, with: error) }
        span.end()
    }
}

/// Why a session's open transaction was lost (see ``DBSessionPhase/lost(_:)``). Boxed, so the
/// phase stays small.
final class DBLostTransaction: Sendable {
    let error: DBError

    init(_ error: DBError) { self.error = error }
}

/// A session's engine and leased connection, boxed: the session's phase then has no generic
/// payload.
final class DBLease<Engine: DatabaseEngine>: Sendable {
    let engine: Engine
    let connection: Engine.Connection
    /// The connect's metrics and tracer for the lease's host.
    let instruments: DBHostInstruments
    /// When the connection was leased, for ``DBMetricName/connectionUseTime``.
    let leasedAt: ContinuousClock.Instant

    init(_ engine: Engine, _ connection: Engine.Connection, instruments: DBHostInstruments) {
        self.engine = engine
        self.connection = connection
        self.instruments = instruments
        self.leasedAt = .now
    }

    /// Gives the connection back to the engine and records how long it was held.
    func release(reusable: Bool) async {
        instruments.useTime.record(duration: leasedAt.duration(to: .now))
        await engine.releaseConnection(connection, reusable: reusable)
    }
}

/// Whether a session closed, as a non-generic object: the context's session lookup reads it
/// without casting the session back to its engine type (a cast costs a metadata lookup).
final class DBSessionLiveness: Sendable {
    private let closed = Atomic<Bool>(false)

    var isClosed: Bool { closed.load(ordering: .acquiring) }

    func close() { closed.store(true, ordering: .releasing) }
}
