import PostgresNIO
import Synchronization

/// One connection borrowed from `PostgresClient` for longer than a closure call.
///
/// `PostgresClient` lends connections only inside `withConnection {}`. A lease runs that call
/// in its own task, hands the connection out, and keeps the closure suspended until the session
/// releases it; then the closure returns and the pool takes the connection back. Every path —
/// the borrower is cancelled or gives up before the connection arrives, the release comes before
/// the hand-over, the engine shuts down — ends with the closure returning exactly once.
final class PostgresLease: Sendable {
    private enum Handover {
        /// Nobody waits yet and nothing arrived.
        case idle
        /// The borrower waits for the connection.
        case waiting(CheckedContinuation<PostgresConnection, any Error>)
        /// The connection arrived before the borrower started waiting.
        case arrived(PostgresConnection)
        /// The borrower has the connection.
        case handedOut
        /// The borrower gave up (cancelled, timed out, failed); a late connection goes straight back.
        case abandoned(any Error)
    }

    private struct State {
        var handover = Handover.idle
        var releaseDecision: Bool?
        var releaseWaiter: CheckedContinuation<Bool, Never>?
    }

    private let state = Mutex(State())

    /// The borrower took a parked connection directly: nothing will be delivered.
    func markHandedOut() {
        state.withLock { $0.handover = .handedOut }
    }

    // MARK: Holder side (the task inside withConnection)

    /// Offers the connection; `false` when the borrower already gave up.
    func deliver(_ connection: PostgresConnection) -> Bool {
        settle(.success(connection))
    }

    /// The holder task could not get a connection. Fails the lease unless a connection already
    /// reached it (another holder may have served it: see `PostgresEngine.hold`).
    func holderFailed(_ error: any Error) {
        settle(.failure(error))
    }

    /// Ends a hand-over that is still open with `outcome`; `false` when it was not open.
    @discardableResult
    private func settle(_ outcome: Result<PostgresConnection, any Error>) -> Bool {
        let waiter = state.withLock { state -> CheckedContinuation<PostgresConnection, any Error>?? in
            let waiter: CheckedContinuation<PostgresConnection, any Error>?
            switch state.handover {
            case .idle: waiter = nil
            case .waiting(let continuation): waiter = continuation
            case .abandoned, .arrived, .handedOut: return nil
            }
            switch outcome {
            case .success(let connection): state.handover = waiter == nil ? .arrived(connection) : .handedOut
            case .failure(let error): state.handover = .abandoned(error)
            }
            return .some(waiter)
        }
        guard let waiter else { return false }
        waiter?.resume(with: outcome)
        return true
    }

    /// Suspends until the borrower releases; returns whether the connection may be pooled again.
    func waitForRelease() async -> Bool {
        await withCheckedContinuation { continuation in
            let decided = state.withLock { state -> Bool? in
                if let decision = state.releaseDecision { return decision }
                state.releaseWaiter = continuation
                return nil
            }
            if let decided { continuation.resume(returning: decided) }
        }
    }

    // MARK: Borrower side

    /// Waits for the connection.
    func connection() async throws -> PostgresConnection {
        try await withCheckedThrowingContinuation { continuation in
            let outcome = state.withLock { state -> Result<PostgresConnection, any Error>? in
                switch state.handover {
                case .idle:
                    state.handover = .waiting(continuation)
                    return nil
                case .arrived(let connection):
                    state.handover = .handedOut
                    return .success(connection)
                case .abandoned(let error):
                    return .failure(error)
                case .waiting, .handedOut:
                    preconditionFailure("a lease is awaited once")
                }
            }
            if let outcome { continuation.resume(with: outcome) }
        }
    }

    /// Gives up waiting with `error`. A connection that already arrived but was not taken is
    /// released at once. Returns `false` when the borrower already has the connection.
    @discardableResult
    func abandon(_ error: any Error) -> Bool {
        let (waiter, returnArrived, abandoned) = state.withLock {
            state -> (CheckedContinuation<PostgresConnection, any Error>?, Bool, Bool) in
            switch state.handover {
            case .idle:
                state.handover = .abandoned(error)
                return (nil, false, true)
            case .waiting(let continuation):
                state.handover = .abandoned(error)
                return (continuation, false, true)
            case .arrived:
                state.handover = .abandoned(error)
                return (nil, true, true)
            case .handedOut, .abandoned:
                return (nil, false, false)
            }
        }
        waiter?.resume(throwing: error)
        if returnArrived { release(reusable: true) }
        return abandoned
    }

    /// Lets the holder's closure return. Idempotent: the first decision wins.
    func release(reusable: Bool) {
        let waiter = state.withLock { state -> CheckedContinuation<Bool, Never>? in
            guard state.releaseDecision == nil else { return nil }
            state.releaseDecision = reusable
            defer { state.releaseWaiter = nil }
            return state.releaseWaiter
        }
        waiter?.resume(returning: reusable)
    }
}
