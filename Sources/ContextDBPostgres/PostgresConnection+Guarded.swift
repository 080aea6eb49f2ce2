import ContextDB
import Logging
import NIOCore
import PostgresNIO
import Synchronization

extension PostgresConnection {
    /// Runs one statement and collects its rows, so that it never waits forever.
    ///
    /// PostgresNIO 1.33.2 never answers a statement written to a connection the server has
    /// already closed (the write reaches a pipeline without its handler, and the statement's
    /// promise is dropped). So a statement
    /// - fails at once with `DBError.Code.connectionLost` when the connection is
    ///   closed before it is sent;
    /// - is checked on the connection's event loop right after its write (the loop runs tasks in
    ///   order): when the connection closed before the write arrived, it fails with
    ///   `DBError.Code.connectionLost` instead of waiting;
    /// - with a `timeout`, is cancelled at the deadline (`cancel`), and its connection closed
    ///   `grace` later when the server answers neither.
    ///
    /// The checks are event-loop callbacks; only a cancel request runs in a task of its own.
    /// While the connection is open, the statement's caller waits for that request, and when the
    /// server did not confirm it, closes the connection: a late cancel must never reach the
    /// connection's next statement.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - host: The server, for errors.
    ///   - logger: Where PostgresNIO logs the statement.
    ///   - timeout: The client-side deadline; `nil` for none.
    ///   - cancel: Asks the server to cancel the statement (PostgreSQL's cancel request); returns
    ///     whether the server confirmed it.
    ///   - grace: How long after the deadline (and the cancel) the connection is closed when the
    ///     statement still has no answer. Default ``PostgresEngine/cancelGrace``.
    /// - Returns: The rows and the command tag.
    /// - Throws: `DBError.Code.connectionLost` when the server closed the connection
    ///   (with the server's message and SQLSTATE when it sent one; with a ``StatementNotSent``
    ///   cause when the statement never left), `DBError.Code.statementTimeout` when
    ///   the deadline passed, or PostgresNIO's error for a failed statement.
    func guardedQuery(
        _ query: PostgresQuery,
        host: String,
        logger: Logger,
        timeout: Duration?,
        cancel: (@Sendable () async -> Bool)? = nil,
        grace: Duration = PostgresEngine.cancelGrace
    ) async throws -> PostgresQueryResult {
        try await guarded(host: host, timeout: timeout, cancel: cancel, grace: grace) { deadline in
            let answer = sendGuarded(query, logger: logger)
            // The deadline stops the moment the answer arrives, on the event loop.
            if let deadline { answer.whenComplete { _ in deadline.answered() } }
            return try await answer.get()
        }
    }

    /// Runs `answer` (a statement's round trip) with the checks of
    /// ``guardedQuery(_:host:logger:timeout:cancel:grace:)``: not on a closed connection,
    /// bounded by `timeout`, failures classified.
    func guarded<Result>(
        host: String,
        timeout: Duration?,
        cancel: (@Sendable () async -> Bool)?,
        grace: Duration,
        _ answer: (StatementDeadline?) async throws -> Result
    ) async throws -> Result {
        guard !isClosed else {
            throw DBError(
                .connectionLost,
                "the server had closed the connection before the statement was sent (the backend was terminated, timed out, or the server restarted); the connection is discarded",
                host: host, underlying: StatementNotSent()
            )
        }
        guard let timeout else {
            do {
                return try await answer(nil)
            } catch {
                throw classify(error, host: host, timedOut: nil)
            }
        }
        let deadline = StatementDeadline(self, timeout: timeout, grace: grace, cancel: cancel)
        do {
            let result = try await answer(deadline)
            deadline.answered()
            await settleCancel(deadline)
            return result
        } catch {
            deadline.answered()
            await settleCancel(deadline)
            throw classify(error, host: host, timedOut: deadline.timedOut ? timeout : nil)
        }
    }

    /// Sends a statement; its answer fails with ``StatementNotSent`` instead of never coming
    /// when the connection is closed before or as the statement is written.
    func sendGuarded(_ query: PostgresQuery, logger: Logger) -> EventLoopFuture<PostgresQueryResult> {
        guard !isClosed else { return eventLoop.makeFailedFuture(StatementNotSent()) }
        let eventLoop = self.eventLoop
        let answer = eventLoop.makePromise(of: PostgresQueryResult.self)
        self.query(query, logger: logger).cascade(to: answer)
        eventLoop.execute { [self] in
            // The write above ran before this; if the connection is closed now, either its
            // handler failed the statement already, or the write never reached it.
            guard isClosed else { return }
            eventLoop.scheduleTask(in: .milliseconds(50)) { answer.fail(StatementNotSent()) }
        }
        return answer.futureResult
    }

    /// Sends a statement with a deadline past which the connection is closed, which fails the
    /// statement: for the engine's own statements, which nobody cancels.
    func sendGuarded(_ query: PostgresQuery, logger: Logger, timeout: Duration) -> EventLoopFuture<PostgresQueryResult> {
        let answer = sendGuarded(query, logger: logger)
        let timer = eventLoop.scheduleTask(in: TimeAmount(timeout)) { [self] in closeQuietly() }
        answer.whenComplete { _ in timer.cancel() }
        return answer
    }

    /// A cancel request on its way must arrive before the connection's next statement: wait for
    /// it while the connection is open (a closed one runs no next statement), and close the
    /// connection when the server did not confirm it.
    private func settleCancel(_ deadline: StatementDeadline) async {
        guard deadline.timedOut, !isClosed else { return }
        if await !deadline.cancelConfirmed() { closeQuietly() }
    }

    /// Turns a failure into the error the session acts on.
    private func classify(_ error: any Error, host: String, timedOut timeout: Duration?) -> any Error {
        if error is StatementNotSent {
            return DBError(
                .connectionLost,
                "the server closed the connection before the statement reached it; the connection is discarded",
                host: host, underlying: error
            )
        }
        let psqlError = error as? PSQLError
        let serverInfo = psqlError?.serverInfo
        let closing = psqlError.map { error in
            [PSQLError.Code.serverClosedConnection, .clientClosedConnection, .uncleanShutdown, .connectionError].contains(error.code)
        } ?? false
        if let timeout {
            // The deadline's own close fails the statement, maybe before the channel is inactive.
            if isClosed || closing {
                return DBError(
                    .statementTimeout,
                    "the statement ran past the statement timeout (\(timeout)) and the server answered neither it nor the cancel request, so the connection was closed",
                    host: host, underlying: ClosedAtDeadline(cause: error)
                )
            }
            if serverInfo?[.sqlState] == "57014" {
                return DBError(
                    .statementTimeout, "the statement ran past the statement timeout (\(timeout)) and was cancelled",
                    host: host, underlying: error
                )
            }
        }
        let reason = serverInfo.map { info in
            ": \(info[.message] ?? "no message") (SQLSTATE \(info[.sqlState] ?? "?"))"
        } ?? ""
        let fatal = serverInfo?[.severity] == "FATAL" || serverInfo?[.severity] == "PANIC"
        if fatal || closing || isClosed {
            return DBError(
                .connectionLost, "the server closed the connection while the statement ran\(reason)",
                host: host, underlying: error
            )
        }
        return error
    }
}

/// The cause of a `DBError.Code.statementTimeout` whose connection was closed at the
/// deadline: the connection is gone, whatever `isClosed` says yet.
struct ClosedAtDeadline: Error, CustomStringConvertible {
    let cause: any Error
    var description: String { "the connection was closed at the statement's deadline" }
}

/// The cause of a `DBError.Code.connectionLost` whose statement never reached the
/// server: retrying it elsewhere is safe, and a `COMMIT` that was never sent committed nothing.
struct StatementNotSent: Error, CustomStringConvertible {
    var description: String { "the statement was not sent" }
}

/// A statement's client-side deadline: at `timeout`, a cancel request; `grace` later, when the
/// statement still has no answer, the connection is closed, which fails the statement.
///
/// Every phase change happens under one lock — the deadline timer, the grace timer (both on the
/// connection's event loop) and the answer — so they happen in one order.
final class StatementDeadline: Sendable {
    private enum Phase: Sendable {
        case running(Scheduled<Void>?)
        case timedOut(Task<Bool, Never>?)
        case answered
        case answeredLate(Task<Bool, Never>?)
    }

    private let phase = Mutex<Phase>(.running(nil))

    init(_ connection: PostgresConnection, timeout: Duration, grace: Duration, cancel: (@Sendable () async -> Bool)?) {
        let eventLoop = connection.eventLoop
        let timer = eventLoop.scheduleTask(in: TimeAmount(timeout)) { [self] in
            let started = phase.withLock { phase -> Bool in
                guard case .running = phase else { return false }
                // A timer callback has no task to run in: the cancel request gets its own, and
                // the statement's caller awaits it (`cancelConfirmed()`).
                phase = .timedOut(cancel.map { cancel in Task { await cancel() } })
                return true
            }
            guard started else { return }
            eventLoop.scheduleTask(in: TimeAmount(grace)) { [self] in
                let close = phase.withLock { phase in
                    if case .timedOut = phase { return true }
                    return false
                }
                if close { connection.closeQuietly() }
            }
        }
        phase.withLock { phase in
            if case .running = phase { phase = .running(timer) }
        }
    }

    /// The statement has its answer (rows or an error): the deadline no longer applies.
    func answered() {
        let pending = phase.withLock { phase -> Scheduled<Void>? in
            switch phase {
            case .running(let timer):
                phase = .answered
                return timer
            case .timedOut(let task):
                phase = .answeredLate(task)
                return nil
            case .answered, .answeredLate:
                return nil
            }
        }
        pending?.cancel()
    }

    /// Whether the deadline passed before the answer.
    var timedOut: Bool {
        phase.withLock { phase in
            switch phase {
            case .timedOut, .answeredLate: return true
            case .running, .answered: return false
            }
        }
    }

    /// Waits for the cancel request the deadline started; whether the server confirmed it
    /// (`false` also when none could be sent).
    func cancelConfirmed() async -> Bool {
        let task = phase.withLock { phase -> Task<Bool, Never>? in
            switch phase {
            case .timedOut(let task), .answeredLate(let task): return task
            case .running, .answered: return nil
            }
        }
        return await task?.value ?? false
    }
}
