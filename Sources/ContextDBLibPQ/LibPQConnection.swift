import CLibPQ
import ContextDB
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One libpq connection (`PGconn`), driven on a serial dispatch queue of its own: libpq's
/// blocking calls run there, never on Swift concurrency's cooperative pool.
///
/// A statement that outlives its deadline, or whose task is cancelled, gets a cancel request
/// (`PQcancel`); if the server answers neither within ``LibPQEngine/cancelGrace``, the socket is
/// shut down, so the statement fails at once and the connection is discarded.
// @unchecked Sendable: `pg` is only read or written on `queue`, a serial queue — never from two
// threads at once — and in `deinit`, when nothing else holds the connection. The other stored
// properties are immutable or synchronized (`Mutex`, `Atomic`). `canceller` (a `PGcancel`) may
// be used from any thread: libpq documents `PQcancel` as thread-safe. `socket` is a duplicate of
// libpq's descriptor, owned by this object and closed only in `deinit`, so shutting it down
// never touches a descriptor number the process reused; shutting down a socket is safe beside
// a read blocked on it.
public final class LibPQConnection: @unchecked Sendable {
    private let queue: DispatchQueue
    private var pg: OpaquePointer?
    private let canceller: OpaquePointer?
    private let socket: Int32
    /// The statement running now (its number), so a late timer never cancels the next one.
    private let running = Mutex<(current: UInt64?, next: UInt64)>((nil, 0))
    private let broken = Atomic<Bool>(false)
    /// The server this connection reached, as `host:port` (libpq's `PQhost`, `PQport`).
    public let server: String
    /// The server's process for this connection (`PQbackendPID`, as `pg_backend_pid()` says).
    public let backendPID: Int32  // PQbackendPID
    /// The server's version, e.g. `150004` for 15.4 (`PQserverVersion`).
    public let serverVersion: Int32

    private init(queue: DispatchQueue, pg: OpaquePointer) {
        self.queue = queue
        self.pg = pg
        self.canceller = PQgetCancel(pg)
        self.socket = dup(PQsocket(pg))
        let host = PQhost(pg).map { String(cString: $0) } ?? "?"
        let port = PQport(pg).map { String(cString: $0) } ?? "?"
        self.server = host.hasPrefix("/") ? "\(host)/.s.PGSQL.\(port)" : "\(host):\(port)"
        self.backendPID = PQbackendPID(pg)
        self.serverVersion = PQserverVersion(pg)
    }

    deinit {
        if let canceller { PQfreeCancel(canceller) }
        if let pg { PQfinish(pg) }
        if socket >= 0 { closeDescriptor(socket) }
    }

    /// Whether the connection can serve another statement: libpq has not seen it break.
    public var isUsable: Bool { !broken.load(ordering: .relaxed) }

    /// Opens a connection with `PQconnectdbParams` (`expand_dbname` on, so a `dbname` value may be
    /// a whole connection string; later keywords override earlier ones), on a queue of its own.
    /// - Throws: `DBError.Code.connectionFailed` with libpq's reason (never the password).
    static func connect(_ keywords: [(String, String)]) async throws -> LibPQConnection {
        let queue = DispatchQueue(label: "ContextDB.LibPQ.connection")
        return try await withCheckedThrowingContinuation { continuation in
            queue.async {
                let names = keywords.map { strdup($0.0) } + [nil]
                let values = keywords.map { strdup($0.1) } + [nil]
                defer { (names + values).forEach { free($0) } }
                let pg = names.withUnsafeBufferPointer { names in
                    values.withUnsafeBufferPointer { values in
                        names.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: names.count) { names in
                            values.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: values.count) { values in
                                PQconnectdbParams(names, values, 1)
                            }
                        }
                    }
                }
                guard let pg, PQstatus(pg) == CONNECTION_OK else {
                    let reason = pg.map { Self.message(PQerrorMessage($0)) } ?? "out of memory"
                    if let pg { PQfinish(pg) }
                    continuation.resume(throwing: DBError(.connectionFailed, "could not connect: \(reason)"))
                    return
                }
                continuation.resume(returning: LibPQConnection(queue: queue, pg: pg))
            }
        }
    }

    /// Runs one statement with text parameters (`PQexecParams`) and collects its rows.
    /// - Parameters:
    ///   - sql: The statement, with `$1`, `$2`… for the parameters.
    ///   - parameters: The parameters in PostgreSQL's text format; `nil` for NULL.
    ///   - timeout: Cancel the statement past it (and shut the socket down ``LibPQEngine/cancelGrace``
    ///     later if the server answers neither). `nil`: no deadline.
    /// - Throws: `DBError` — `.statementTimeout`, `.connectionLost`, or `.queryFailed` with the
    ///   server's message and SQLSTATE (``LibPQServerError``); `CancellationError` when the task
    ///   was cancelled and the statement was cancelled or its socket shut down.
    func execute(_ sql: String, _ parameters: [String?] = [], timeout: Duration? = nil) async throws -> LibPQResult {
        guard isUsable else {
            throw DBError(
                .connectionLost, "the connection was lost before this statement; it is discarded", host: server,
                underlying: LibPQStatementNotSent()
            )
        }
        guard !sql.utf8.contains(0), !parameters.contains(where: { $0?.utf8.contains(0) == true }) else {
            throw DBError(
                .queryFailed, "a statement or value contains a NUL character, which PostgreSQL text cannot hold",
                host: server, underlying: LibPQStatementNotSent()
            )
        }
        let statement = beginStatement()
        let timedOut = Atomic<Bool>(false)
        let cancelled = Atomic<Bool>(false)
        let timer = timeout.map { timeout in
            DispatchWorkItem { [self] in
                interrupt(statement) { timedOut.store(true, ordering: .relaxed) }
            }.scheduled(after: timeout)
        }
        defer { timer?.cancel() }
        let outcome = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<LibPQResult, LibPQServerError>, Never>) in
                queue.async { [self] in
                    continuation.resume(returning: runStatement(sql, parameters))
                }
            }
        } onCancel: {
            // PQcancel opens a connection of its own: never on the cancelling thread.
            DispatchQueue.global().async { [self] in
                interrupt(statement) { cancelled.store(true, ordering: .relaxed) }
            }
        }
        switch outcome {
        case .success(let result):
            return result
        case .failure(let error):
            if timedOut.load(ordering: .relaxed) {
                throw DBError(
                    .statementTimeout, "the statement ran past its \(timeout!) deadline and was cancelled (\(error.message))",
                    host: server, underlying: error
                )
            }
            if cancelled.load(ordering: .relaxed), error.sqlState == "57014" || !isUsable { throw CancellationError() }
            if !isUsable {
                throw DBError(.connectionLost, "the connection was lost: \(error.message)", host: server, underlying: error)
            }
            throw DBError(
                .queryFailed, "the server rejected the statement: \(error.message) (SQLSTATE \(error.sqlState ?? "?"))",
                host: server, underlying: error
            )
        }
    }

    /// Resets the connection for its next lease (`DISCARD ALL`) on its queue — cancelled, then
    /// its socket shut down, past `bound` — and calls back with whether it succeeded. No task.
    func reset(within bound: Duration, _ done: @escaping @Sendable (Bool) -> Void) {
        guard isUsable else { return done(false) }
        let statement = beginStatement()
        // The deadline: once the reset ended, its `interrupt` finds another statement number
        // (or none) and does nothing.
        _ = DispatchWorkItem { [self] in interrupt(statement) {} }.scheduled(after: bound)
        queue.async { [self] in
            let outcome = runStatement("DISCARD ALL", [])
            if case .success = outcome { done(isUsable) } else { done(false) }
        }
    }

    /// Numbers a statement about to run and marks it running (for `interrupt`).
    private func beginStatement() -> UInt64 {
        running.withLock { state in
            state.next &+= 1
            state.current = state.next
            return state.next
        }
    }

    /// Runs a statement begun with `beginStatement()`, on `queue`, then marks none running and
    /// notes a connection libpq saw break.
    private func runStatement(_ sql: String, _ parameters: [String?]) -> Result<LibPQResult, LibPQServerError> {
        let outcome = run(sql, parameters)
        running.withLock { $0.current = nil }
        if PQstatus(pg) != CONNECTION_OK { broken.store(true, ordering: .relaxed) }
        return outcome
    }

    /// Asks the server to cancel statement `statement` if it still runs (calling `interrupted`
    /// first), and shuts the socket down ``LibPQEngine/cancelGrace`` later if it still runs then.
    /// Runs on a dispatch thread: `PQcancel` blocks while it sends the request. The check and the
    /// request are made under the `running` lock, which the statement's end takes too, so a late
    /// request never reaches the connection's next statement.
    private func interrupt(_ statement: UInt64, interrupted: () -> Void) {
        let sent = running.withLock { state -> Bool in
            guard state.current == statement else { return false }
            interrupted()
            if let canceller {
                var buffer = [CChar](repeating: 0, count: 256)
                _ = PQcancel(canceller, &buffer, Int32(buffer.count))
            }
            return true
        }
        guard sent else { return }
        _ = DispatchWorkItem { [self] in
            running.withLock { state in
                // Under the lock: the statement cannot end (and the connection go back to the
                // pool) between the check and the shutdown.
                guard state.current == statement else { return }
                broken.store(true, ordering: .relaxed)
                _ = shutdown(socket, Int32(SHUT_RDWR))
            }
        }.scheduled(after: LibPQEngine.cancelGrace)
    }

    /// Runs on `queue`.
    private func run(_ sql: String, _ parameters: [String?]) -> Result<LibPQResult, LibPQServerError> {
        let values = parameters.map { $0.map { strdup($0) } ?? nil }
        defer { values.forEach { free($0) } }
        let result = values.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: UnsafePointer<CChar>?.self) { values in
                PQexecParams(pg, sql, Int32(parameters.count), nil, values.baseAddress, nil, nil, 0)
            }
        }
        defer { PQclear(result) }
        guard let result else {
            return .failure(LibPQServerError(sqlState: nil, message: Self.message(PQerrorMessage(pg))))
        }
        let status = PQresultStatus(result)
        guard status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK else {
            let state = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) }
            let primary = PQresultErrorField(result, Int32(UInt8(ascii: "M"))).map { String(cString: $0) }
            return .failure(LibPQServerError(sqlState: state, message: primary ?? Self.message(PQresultErrorMessage(result))))
        }
        let columnCount = Int(PQnfields(result))
        let columns = (0..<columnCount).map { String(cString: PQfname(result, Int32($0))) }
        let rows = (0..<Int(PQntuples(result))).map { row in
            (0..<columnCount).map { column -> String? in
                PQgetisnull(result, Int32(row), Int32(column)) == 1 ? nil : String(cString: PQgetvalue(result, Int32(row), Int32(column)))
            }
        }
        let tag = PQcmdStatus(result).map { String(cString: $0) } ?? ""
        return .success(LibPQResult(columns: columns, rows: rows, commandTag: tag))
    }

    /// Shuts the socket down — a statement running on it fails at once — and closes the
    /// connection (`PQfinish`) on its queue, without waiting.
    func closeQuietly() {
        running.withLock { _ in
            broken.store(true, ordering: .relaxed)
            _ = shutdown(socket, Int32(SHUT_RDWR))
        }
        queue.async { [self] in
            if let pg { PQfinish(pg) }
            pg = nil
        }
    }

    private static func message(_ text: UnsafePointer<CChar>?) -> String {
        guard let text else { return "no message" }
        var message = String(cString: text)
        while message.last?.isWhitespace == true { message.removeLast() }
        return message
    }
}

/// What a statement returned: its columns, its rows in text format, and its command tag.
struct LibPQResult: Sendable {
    var columns: [String]
    var rows: [[String?]]
    /// `PQcmdStatus`: `INSERT 0 1`, `COMMIT`, `ROLLBACK`…
    var commandTag: String
}

/// Marks an error raised before a statement was sent: nothing of it reached the server.
struct LibPQStatementNotSent: Error, CustomStringConvertible {
    var description: String { "the statement was not sent" }
}

/// An error the server (or libpq) reported for a statement.
public struct LibPQServerError: Error, Sendable, CustomStringConvertible {
    /// The SQLSTATE (PostgreSQL docs, "PostgreSQL Error Codes"), when the server sent one.
    public var sqlState: String?
    /// The server's (or libpq's) message.
    public var message: String

    /// The message, and the SQLSTATE when there is one.
    public var description: String { sqlState.map { "\(message) (SQLSTATE \($0))" } ?? message }
}

extension DispatchWorkItem {
    /// Runs the item on a global queue after `delay`; returns it, to cancel.
    fileprivate func scheduled(after delay: Duration) -> DispatchWorkItem {
        // Clamped to a year: a "huge" deadline must not overflow.
        let seconds = min(delay.components.seconds, 365 * 24 * 3600)
        let nanoseconds = seconds * 1_000_000_000 + delay.components.attoseconds / 1_000_000_000
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(nanoseconds)), execute: self)
        return self
    }
}

/// `close(2)`, by its module's name: inside `LibPQConnection`, `close` is the connection's own.
private func closeDescriptor(_ descriptor: Int32) {
    #if canImport(Glibc)
    _ = Glibc.close(descriptor)
    #elseif canImport(Darwin)
    _ = Darwin.close(descriptor)
    #endif
}
