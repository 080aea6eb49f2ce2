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
    /// - fails at once with ``DBError/Code/connectionLost`` when the connection is closed before
    ///   it is sent;
    /// - is checked on the connection's event loop right after its write (the loop runs tasks in
    ///   order): when the connection closed before the write arrived, it fails with
    ///   ``DBError/Code/connectionLost`` instead of waiting;
    /// - with a `timeout`, is cancelled at the deadline (`cancel`), and its connection closed
    ///   `grace` later when the server answers neither.
    ///
    /// No task is started: the checks are event-loop callbacks.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - host: The server, for errors.
    ///   - logger: Where PostgresNIO logs the statement.
    ///   - timeout: The client-side deadline; `nil` for none.
    ///   - cancel: Asks the server to cancel the statement (PostgreSQL's cancel request).
    ///   - grace: How long after the deadline (and the cancel) the connection is closed when the
    ///     statement still has no answer. Default ``PostgresEngine/cancelGrace``.
    /// - Returns: The rows and the command tag.
    /// - Throws: ``DBError/Code/connectionLost`` when the server closed the connection (with the
    ///   server's message and SQLSTATE when it sent one), ``DBError/Code/statementTimeout`` when
    ///   the statement was cancelled at its deadline, or PostgresNIO's error for a failed statement.
    func guardedQuery(
        _ query: PostgresQuery,
        host: String,
        logger: Logger,
        timeout: Duration?,
        cancel: (@Sendable () -> Void)? = nil,
        grace: Duration = PostgresEngine.cancelGrace
    ) async throws -> PostgresQueryResult {
        guard !isClosed else {
            throw DBError(
                .connectionLost,
                "the server had closed the connection before the statement was sent (the backend was terminated, timed out, or the server restarted); the connection is discarded",
                host: host
            )
        }
        let eventLoop = self.eventLoop
        let answer = eventLoop.makePromise(of: PostgresQueryResult.self)
        self.query(query, logger: logger).cascade(to: answer)
        eventLoop.execute { [self] in
            // The write above ran before this; if the connection is closed now, either its
            // handler failed the statement already, or the write never reached it.
            guard isClosed else { return }
            eventLoop.scheduleTask(in: .milliseconds(50)) { answer.fail(SentToClosedConnection()) }
        }
        let watch = timeout.map { StatementDeadline(self, timeout: $0, grace: grace, cancel: cancel) }
        do {
            let result = try await answer.futureResult.get()
            watch?.answered()
            return result
        } catch {
            watch?.answered()
            throw classify(error, host: host, timeout: timeout, timedOut: watch?.timedOut ?? false)
        }
    }

    /// Turns a failure into the error the session acts on.
    private func classify(_ error: any Error, host: String, timeout: Duration?, timedOut: Bool) -> any Error {
        let serverInfo = (error as? PSQLError)?.serverInfo
        let reason = serverInfo.map { info in
            ": \(info[.message] ?? "no message") (SQLSTATE \(info[.sqlState] ?? "?"))"
        } ?? ""
        if timedOut {
            if isClosed {
                return DBError(
                    .connectionLost,
                    "the statement ran past the statement timeout (\(timeout.map { "\($0)" } ?? "?")) and the server answered neither it nor the cancel request; the connection was closed",
                    host: host, underlying: error
                )
            }
            if serverInfo?[.sqlState] == "57014" {
                return DBError(
                    .statementTimeout,
                    "the statement ran past the statement timeout (\(timeout.map { "\($0)" } ?? "?")) and was cancelled",
                    host: host, underlying: error
                )
            }
        }
        if error is SentToClosedConnection {
            return DBError(
                .connectionLost,
                "the server closed the connection before the statement reached it; the connection is discarded",
                host: host
            )
        }
        let fatal = serverInfo?[.severity] == "FATAL" || serverInfo?[.severity] == "PANIC"
        if fatal || isClosed {
            return DBError(
                .connectionLost, "the server closed the connection while the statement ran\(reason)",
                host: host, underlying: error
            )
        }
        return error
    }
}

/// The statement was written after the connection closed: PostgresNIO would never answer it.
private struct SentToClosedConnection: Error {}

/// A statement's client-side deadline: at `timeout`, a cancel request; `grace` later, when the
/// statement still has no answer, the connection is closed, which fails the statement.
private final class StatementDeadline: Sendable {
    private enum Phase: Int {
        case running, timedOut, answered, answeredLate
    }

    private let phase = Atomic<Int>(Phase.running.rawValue)
    private let timer = Mutex<Scheduled<Void>?>(nil)

    init(_ connection: PostgresConnection, timeout: Duration, grace: Duration, cancel: (@Sendable () -> Void)?) {
        let eventLoop = connection.eventLoop
        let scheduled = eventLoop.scheduleTask(in: TimeAmount(timeout)) { [self] in
            guard move(from: .running, to: .timedOut) else { return }
            cancel?()
            eventLoop.scheduleTask(in: TimeAmount(grace)) { [self] in
                if phase.load(ordering: .acquiring) == Phase.timedOut.rawValue {
                    let closed: EventLoopFuture<Void> = connection.close()
                    _ = closed
                }
            }
        }
        timer.withLock { $0 = scheduled }
    }

    private func move(from: Phase, to: Phase) -> Bool {
        phase.compareExchange(expected: from.rawValue, desired: to.rawValue, ordering: .acquiringAndReleasing).exchanged
    }

    /// Whether the deadline passed before the answer.
    var timedOut: Bool {
        let now = phase.load(ordering: .acquiring)
        return now == Phase.timedOut.rawValue || now == Phase.answeredLate.rawValue
    }

    /// The statement has its answer: no cancel, no close.
    func answered() {
        if move(from: .running, to: .answered) {
            timer.withLock { $0 }?.cancel()
        } else {
            _ = move(from: .timedOut, to: .answeredLate)
        }
    }
}
