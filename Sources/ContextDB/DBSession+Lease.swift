import Synchronization
import Tracing

/// Leasing a connection, opening transactions, and what a failure leaves behind.
extension DBSession {
    /// Marks the session in use by this task: the only way into an operation.
    nonisolated(nonsending) func enter() async throws {
        if case .savepoint(let shared, _) = mode {
            // Savepoint sessions share one connection: wait for it instead of failing, so
            // concurrent requests in a test are serialized, never interleaved.
            await shared.lock()
            state.withLock { $0.busy = true }
            return
        }
        try state.withLock { state in
            // Set under this lock by close(), so reading it here is ordered with it.
            if liveness.isClosed {
                throw DBError(.sessionClosed, "this session was closed; ask the connect for a new one with session()", connect: connect.label, host: state.host)
            }
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

    /// Ends this task's operation; gives the connection back when `close()` ran meanwhile.
    nonisolated(nonsending) func leave() async {
        if case .savepoint(let shared, _) = mode {
            state.withLock { $0.busy = false }
            shared.unlock()
            return
        }
        let (release, lostEnded) = state.withLock { state -> (DBLease<Engine>?, Bool) in
            state.busy = false
            guard state.releaseWhenIdle else { return (nil, false) }
            state.releaseWhenIdle = false
            guard let lease = state.phase.lease else {
                // Closed while its connection was lost: nothing to release, the server rolled back.
                defer { state.phase = .idle }
                return (nil, state.phase.hasTransaction)
            }
            return (Self.lease(lease), false)
        }
        if let release { await finalRelease(release) }
        if lostEnded { transactionEnded(.rollback) }
    }

    /// After a statement failed: discards a dead connection, then leaves.
    nonisolated(nonsending) func failed(after error: any Error) async {
        if let lease = state.withLock({ $0.phase.lease.map(Self.lease) }), Self.isLost(lease, after: error) {
            await connectionLost(lostError(error))
        }
        await leave()
    }

    /// Whether `error` left the lease's connection dead: the engine says so, or (for an engine
    /// that cannot tell) the error is ``DBError/Code/connectionLost``.
    static func isLost(_ lease: DBLease<Engine>, after error: any Error) -> Bool {
        (error as? DBError)?.code == .connectionLost || !lease.engine.isConnectionUsable(lease.connection)
    }

    /// The error a lost transaction is remembered by.
    func lostError(_ error: any Error) -> DBError {
        if let error = error as? DBError, error.code == .connectionLost || error.code == .statementTimeout { return error }
        return DBError(.connectionLost, "the connection closed", connect: connect.label, host: host, underlying: error)
    }

    /// The server closed the connection: it is discarded, never pooled; an open transaction is
    /// remembered as lost, so no later statement runs outside it as if nothing happened.
    nonisolated(nonsending) func connectionLost(_ error: DBError) async {
        let release = state.withLock { state -> DBLease<Engine>? in
            let lease = state.phase.lease
            if case .inTransaction = state.phase {
                state.phase = .lost(DBLostTransaction(error))
            } else if case .connected = state.phase, mode.ownsConnection {
                state.phase = .idle
            }
            guard mode.ownsConnection else { return nil }  // the borrowed connection is not ours to close
            return lease.map(Self.lease)
        }
        if let release { await release.release(reusable: false) }
    }

    /// Leases a connection if needed and begins a transaction if none is open. Runs inside
    /// `enter()`. `began` is whether this call sent `BEGIN` (not a test's savepoint).
    nonisolated(nonsending) func prepare() async throws -> (lease: DBLease<Engine>, began: Bool) {
        switch state.withLock({ $0.phase }) {
        case .inTransaction(let lease, _):
            return (Self.lease(lease), false)
        case .idle:
            return (try await acquire(), mode.ownsConnection)
        case .connected(let lease):
            let lease = Self.lease(lease)
            do {
                try await begin(lease)
            } catch let error as DBError where error.code == .connectionLost && mode.ownsConnection {
                // Closed before BEGIN was sent, and no transaction was open on it: a fresh
                // connection to the same host serves.
                return (try await acquire(), true)
            }
            return (lease, mode.ownsConnection)
        case .lost(let lost):
            throw DBError(
                .connectionLost,
                "the connection of this session's open transaction was lost (\(lost.error.message)); its work is gone: roll back (or let the request end) and retry the transaction",
                connect: connect.label, host: lost.error.host ?? host, underlying: lost.error
            )
        }
    }

    /// Opens a transaction (or a test's savepoint); on failure the connection, in an unknown
    /// state, is closed rather than pooled.
    nonisolated(nonsending) func begin(_ lease: DBLease<Engine>) async throws {
        var options = connect.options
        let preventing = connect.writesPrevented && !options.readOnly
        if preventing { options.readOnly = true }
        let (statement, savepoint) = mode.begin(options)
        let span = lease.instruments.startSpan("transaction")
        if let span, span.isRecording, let routing { span.addEvent(routing.event(host: host)) }
        do {
            try await execute(statement, on: lease)
            let trace = DBTransactionTrace(span: span, instruments: lease.instruments)
            state.withLock {
                $0.phase = .inTransaction(lease, savepoint: savepoint)
                $0.trace = trace
                $0.writesPrevented = preventing
            }
        } catch {
            if let span {
                DBHostInstruments.fail(span, with: error)
                span.end()
            }
            guard mode.ownsConnection else { throw error }  // the borrowed connection is not ours to close
            state.withLock { $0.phase = .idle }
            await lease.release(reusable: false)
            throw error
        }
    }

    /// Runs a control statement, timed as ``DBMetricName/operationDuration``.
    @discardableResult
    nonisolated(nonsending) func execute(_ statement: DBControlStatement, on lease: DBLease<Engine>) async throws -> DBControlResult {
        let started = ContinuousClock.now
        do {
            let result = try await lease.engine.execute(statement, on: lease.connection)
            lease.instruments.recordOperation(statement.operationName, since: started)
            return result
        } catch {
            lease.instruments.recordOperation(statement.operationName, since: started, error: error)
            throw error
        }
    }

    /// Times a statement an engine module runs as ``DBMetricName/operationDuration`` (with
    /// `db.operation.name`, and `error.type` when it fails) and, when the connect traces
    /// statements (``DBInstrumentation/tracesStatements``), runs it in a span named after the
    /// operation — with the statement's text only when ``DBInstrumentation/recordsStatementText``
    /// says so, never its bound values. Call it inside `withLeasedConnection`.
    /// - Parameters:
    ///   - operationName: The statement's `db.operation.name`, such as `SELECT`.
    ///   - text: The statement's text, read only when it is recorded.
    ///   - body: Runs the statement.
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws.
    package nonisolated(nonsending) func instrumentStatement<R>(
        _ operationName: String, text: () -> String, _ body: () async throws -> R
    ) async throws -> R {
        let (instruments, transaction) = state.withLock { ($0.phase.lease.map(Self.lease)?.instruments, $0.trace?.span?.context) }
        guard let instruments else { return try await body() }
        var span: (any Span)?
        if instruments.tracesStatements {
            span = instruments.startSpan(operationName, parent: transaction)
            if let span, span.isRecording {
                span.attributes["db.operation.name"] = operationName
                if instruments.recordsStatementText { span.attributes["db.query.text"] = text() }
            }
        }
        let started = ContinuousClock.now
        do {
            let result = try await body()
            instruments.recordOperation(operationName, since: started)
            span?.end()
            return result
        } catch {
            instruments.recordOperation(operationName, since: started, error: error)
            if let span {
                DBHostInstruments.fail(span, with: error)
                span.end()
            }
            throw error
        }
    }

    /// Ends the open transaction's span and counts it, once the session knows how it ended.
    func transactionEnded(_ outcome: DBTransactionOutcome, error: (any Error)? = nil) {
        state.withLock { state in
            defer { state.trace = nil }
            return state.trace
        }?.finish(outcome, error: error)
    }

    /// Leases a connection and begins a transaction. Until the session has had a connection, a
    /// host that fails either step is reported and the next candidate tried, so a host that went
    /// down costs no failed request while another can serve. A pooled connection the server had
    /// already closed (``DBError/Code/connectionLost`` at `BEGIN`) is replaced once on the same
    /// host: nothing ran on it.
    nonisolated(nonsending) func acquire() async throws -> DBLease<Engine> {
        let everLeased = state.withLock { $0.everLeased }
        do {
            return try await acquireOnCandidates()
        } catch let error as DBError where !everLeased && mode.ownsConnection && error.code == .connectionFailed {
            // Every host the hook chose refused the session's first lease. Ask the hook again,
            // once: after a failover it knows (or waits for) the new primary. Before the session
            // ever had a connection nothing of it reached a server, so this is safe.
            let tried = state.withLock { $0.candidates }
            // No other hosts (a pool that was only busy, say; or the hook gave up): the first
            // error stands, it says what happened.
            guard let hosts = try? await connect.rerouted(consistencyToken: consistency?.token), hosts != tried else { throw error }
            state.withLock { state in
                state.candidates = hosts
                state.host = hosts[0]
            }
            return try await acquireOnCandidates()
        }
    }

    /// Leases on the current host, then (before the session ever had a connection) on each
    /// candidate after it, counting a failover for each move.
    nonisolated(nonsending) private func acquireOnCandidates() async throws -> DBLease<Engine> {
        let (current, everLeased, candidates) = state.withLock { ($0.host, $0.everLeased, $0.candidates) }
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
                    if host != hosts.last { connect.countFailover(from: host) }  // the next host is tried
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
        let instruments: DBHostInstruments
        do {
            engine = try await connect.engine(for: host)
            instruments = connect.instruments(for: host, engine: engine)
            let started = ContinuousClock.now
            connection = try await engine.leaseConnection()
            instruments.waitTime.record(duration: started.duration(to: .now))
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
        let lease = DBLease(engine, connection, instruments: instruments)
        state.withLock {
            $0.host = host
            $0.phase = .connected(lease)
        }
        try await begin(lease)
        state.withLock { $0.everLeased = true }
        return lease
    }
}
