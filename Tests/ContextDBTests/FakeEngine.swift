import ContextDB
import Synchronization

/// An in-memory database shared by every fake engine of a test: it records each lease,
/// release and statement, and keeps a one-table "database" so tests can count committed rows.
final class FakeDatabase: Sendable {
    struct State {
        var log: [String] = []
        var nextConnection = 1
        var leased: Set<Int> = []
        var enginesCreated: [String] = []
        var enginesShutDown: [String] = []
        /// The hosts of engines whose `run()` is running, and how to end each (by engine number).
        var running: [Int: (host: String, stop: CheckedContinuation<Void, Never>?)] = [:]
        var stopped: Set<Int> = []
        var nextEngine = 1
        var committedRows = 0
        var pendingRows: [Int: Int] = [:]
        /// Statements (by exact text) that fail the next time they run.
        var failures: Set<String> = []
        /// Hosts whose engine factory throws.
        var unreachableHosts: Set<String> = []
        /// Connections inside a transaction, and those whose transaction a failed statement
        /// aborted (as PostgreSQL does: only `ROLLBACK` or `ROLLBACK TO SAVEPOINT` recovers).
        var inTransaction: Set<Int> = []
        var aborted: Set<Int> = []
        /// Connections the "server" closed: every statement on them fails with `connectionLost`.
        var closedByServer: Set<Int> = []
        /// The next COMMIT commits, then its answer is lost with the connection.
        var losesNextCommitAnswer = false
        /// How many COMMITs saved rows: the "position" a commit that wrote reports.
        var commitPosition = 0
        var gates: [Int: CheckedContinuation<Void, Never>] = [:]
        var waitingForGate: [CheckedContinuation<Void, Never>] = []
    }

    let state = Mutex(State())

    var log: [String] { state.withLock { $0.log } }
    var committedRows: Int { state.withLock { $0.committedRows } }
    var leasedCount: Int { state.withLock { $0.leased.count } }
    var enginesCreated: [String] { state.withLock { $0.enginesCreated } }
    var enginesShutDown: [String] { state.withLock { $0.enginesShutDown } }
    var enginesRunning: [String] { state.withLock { $0.running.values.map(\.host).sorted() } }

    /// Ends the `run()` of engine `number` (shut down, or its task cancelled).
    func stop(_ number: Int) {
        let stop = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.stopped.insert(number)
            defer { state.running[number]?.stop = nil }  // resumed once
            return state.running[number]?.stop
        }
        stop?.resume()
    }

    func record(_ line: String) { state.withLock { $0.log.append(line) } }
    func clearLog() { state.withLock { $0.log.removeAll() } }
    func setReachable(_ host: String, _ reachable: Bool) {
        state.withLock { state in
            if reachable { state.unreachableHosts.remove(host) } else { state.unreachableHosts.insert(host) }
        }
    }
    func failNext(_ statement: String) { state.withLock { _ = $0.failures.insert(statement) } }
    /// Makes the next COMMIT commit, then lose its answer with the connection.
    func loseNextCommitAnswer() { state.withLock { $0.losesNextCommitAnswer = true } }
    /// Ends every leased connection, as `pg_terminate_backend` would: open transactions are lost.
    func terminateLeasedConnections() {
        state.withLock { state in
            for id in state.leased {
                state.closedByServer.insert(id)
                state.pendingRows[id] = nil
                state.inTransaction.remove(id)
                state.aborted.remove(id)
            }
        }
    }

    /// The statements run so far, without leases and releases, e.g. `["c1: BEGIN", "c1: INSERT"]`.
    var statements: [String] { log.filter { !$0.hasPrefix("lease") && !$0.hasPrefix("release") } }

    func makeEngine(host: String) throws -> FakeEngine {
        try state.withLock { state in
            if state.unreachableHosts.contains(host) { throw FakeError.unreachable(host) }
            state.enginesCreated.append(host)
        }
        let number = state.withLock { state in
            defer { state.nextEngine += 1 }
            return state.nextEngine
        }
        return FakeEngine(host: host, database: self, number: number)
    }

    /// Runs `sql`; for a `COMMIT` that saved rows, returns its position (`"1"`, `"2"`, …).
    @discardableResult
    func run(_ sql: String, on connection: FakeEngine.Connection) async throws -> String? {
        if sql == "WAIT" {
            // Parks until `openGate()`: lets a test hold a statement in flight.
            await withCheckedContinuation { continuation in
                let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                    state.gates[connection.id] = continuation
                    return state.waitingForGate.popLast()
                }
                waiter?.resume()
            }
        }
        return try state.withLock { state -> String? in
            let id = connection.id
            if state.closedByServer.contains(id) {
                state.log.append("c\(id): \(sql) (lost)")
                throw DBError(.connectionLost, "the server closed the connection", host: connection.host)
            }
            state.log.append("c\(id): \(sql)")
            let recovers = sql == "ROLLBACK" || sql.hasPrefix("ROLLBACK TO SAVEPOINT")
            if state.aborted.contains(id), !recovers, sql != "COMMIT" {
                throw FakeError.statementFailed("current transaction is aborted")
            }
            if state.failures.remove(sql) != nil {
                if state.inTransaction.contains(id) { state.aborted.insert(id) }
                throw FakeError.statementFailed(sql)
            }
            switch sql {
            case _ where sql.hasPrefix("BEGIN"): state.inTransaction.insert(id)
            case "INSERT": state.pendingRows[id, default: 0] += 1
            case "COMMIT":
                state.inTransaction.remove(id)
                if state.aborted.remove(id) != nil {
                    state.pendingRows[id] = nil
                    throw DBError(.commitFailed, "the server rolled the transaction back", host: connection.host)
                }
                let rows = state.pendingRows.removeValue(forKey: id) ?? 0
                state.committedRows += rows
                if state.losesNextCommitAnswer {
                    state.losesNextCommitAnswer = false
                    state.closedByServer.insert(id)
                    throw DBError(.commitOutcomeUnknown, "COMMIT was sent, but its answer was lost", host: connection.host)
                }
                if rows > 0 {
                    state.commitPosition += 1
                    return "\(state.commitPosition)"
                }
            case "ROLLBACK":
                state.pendingRows[id] = nil
                state.inTransaction.remove(id)
                state.aborted.remove(id)
            case _ where recovers: state.aborted.remove(id)
            default: break
            }
            return nil
        }
    }

    /// Waits until some statement is parked on `WAIT`.
    func waitUntilParked() async {
        await withCheckedContinuation { continuation in
            let parked = state.withLock { state -> Bool in
                if !state.gates.isEmpty { return true }
                state.waitingForGate.append(continuation)
                return false
            }
            if parked { continuation.resume() }
        }
    }

    /// Lets every parked `WAIT` statement finish.
    func openGates() {
        let gates = state.withLock { state in
            defer { state.gates.removeAll() }
            return Array(state.gates.values)
        }
        for gate in gates { gate.resume() }
    }
}

enum FakeError: Error, Equatable {
    case unreachable(String)
    case statementFailed(String)
    case boom
}

struct FakeEngine: DatabaseEngine {
    struct Connection: Sendable {
        let id: Int
        let host: String
        let database: FakeDatabase
    }

    let host: String
    let database: FakeDatabase
    /// Which engine this is, in creation order.
    let number: Int

    func leaseConnection() async throws -> Connection {
        try database.state.withLock { state in
            if state.unreachableHosts.contains(host) { throw FakeError.unreachable(host) }
            let connection = Connection(id: state.nextConnection, host: host, database: database)
            state.nextConnection += 1
            state.leased.insert(connection.id)
            state.log.append("lease c\(connection.id)@\(host)")
            return connection
        }
    }

    func releaseConnection(_ connection: Connection, reusable: Bool) async {
        database.state.withLock { state in
            state.leased.remove(connection.id)
            state.log.append("release c\(connection.id)" + (reusable ? "" : " broken"))
        }
    }

    func execute(_ statement: DBControlStatement, on connection: Connection) async throws -> DBControlResult {
        DBControlResult(consistencyToken: try await database.run(statement.fakeSQL, on: connection))
    }

    /// Positions are commit counts: the larger is the later.
    static func latestConsistencyToken(_ current: String?, _ new: String) -> String {
        guard let current, let old = Int(current), let position = Int(new) else { return new }
        return String(max(old, position))
    }

    func isConnectionUsable(_ connection: Connection) -> Bool {
        !database.state.withLock { $0.closedByServer.contains(connection.id) }
    }

    func shutdown() async {
        database.state.withLock { $0.enginesShutDown.append(host) }
        database.stop(number)
    }

    /// Counts as running (``FakeDatabase/enginesRunning``) until shut down or cancelled.
    func run() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let stopNow = database.state.withLock { state in
                    if state.stopped.contains(number) { return true }
                    state.running[number] = (host, continuation)
                    return false
                }
                if stopNow { continuation.resume() }
            }
        } onCancel: {
            database.stop(number)
        }
        database.state.withLock { _ = $0.running.removeValue(forKey: number) }
    }
}

extension DBSession where Engine == FakeEngine {
    /// Runs a fake statement: `INSERT` adds a pending row, `WAIT` parks until the gate opens.
    func execute(_ sql: String) async throws {
        try await withConnection { connection in
            _ = try await connection.database.run(sql, on: connection)
        }
    }
}

extension DBConnect where Engine == FakeEngine {
    /// A connect on a fresh fake database, for tests.
    static func fake(
        label: String = "default",
        host: String? = "db1",
        options: DBSessionOptions = DBSessionOptions(),
        database: FakeDatabase = FakeDatabase(),
        beforeCreateSession: BeforeCreateSession? = nil,
        chooseHost: ChooseHost? = nil
    ) -> DBConnect<FakeEngine> {
        DBConnect(label: label, host: host, options: options, beforeCreateSession: beforeCreateSession, chooseHost: chooseHost) { host in
            try database.makeEngine(host: host)
        }
    }

}

extension DBControlStatement {
    /// What the fake database runs and logs: PostgreSQL's spelling (the core has no SQL of its
    /// own), which the core's tests assert.
    var fakeSQL: String {
        switch self {
        case .begin(let options):
            // `repeatableRead` → `REPEATABLE READ`
            let level = options.isolationLevel.map { level in
                "ISOLATION LEVEL " + level.rawValue.replacing(/([a-z])([A-Z])/) { "\($0.1) \($0.2)" }.uppercased()
            }
            return ["BEGIN", level, options.readOnly ? "READ ONLY" : nil].compactMap { $0 }.joined(separator: " ")
        case .commit: return "COMMIT"
        case .rollback: return "ROLLBACK"
        case .savepoint(let name): return "SAVEPOINT " + name
        case .releaseSavepoint(let name): return "RELEASE SAVEPOINT " + name
        case .rollbackToSavepoint(let name): return "ROLLBACK TO SAVEPOINT " + name
        }
    }
}
