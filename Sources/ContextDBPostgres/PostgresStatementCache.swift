import ContextDB
import Logging
import NIOCore
import PostgresNIO
import Synchronization

/// The statements each connection of an engine has prepared, so that a statement runs as
/// `Bind`/`Execute` on its second use instead of `Parse`/`Bind`/`Describe`/`Execute` every time
/// (PostgreSQL docs, "Extended Query"; what asyncpg's statement cache and `pgbench -M prepared` do).
///
/// A statement is known by its SQL and the types of its bound values (the same SQL with an
/// `Int` and then an `Int32` is two statements: the server fixed the parameter types when it
/// prepared it). A connection names at most `capacity` statements over its life, failed ones
/// included; past that, statements run unnamed, as without a cache. A statement the server could
/// not prepare (an unknown table, SQLSTATE class 42) or no longer accepts (`cached plan must not
/// change result type` after a schema change, 0A000; `prepared statement … does not exist`,
/// 26000) is forgotten, and prepared under a new name on its next use.
final class PostgresStatementCache: Sendable {
    struct Key: Hashable, Sendable {
        let sql: String
        let types: [PostgresDataType]
    }

    /// How to run one statement: its name on the connection, whether this run prepares it,
    /// and where PostgresNIO must be called.
    struct Plan: Sendable {
        let key: Key
        let name: String
        let isFirstUse: Bool
        let loop: ConnectionLoop
    }

    private struct Entry {
        /// The connection itself: while its entry exists, no other connection can take its
        /// `ObjectIdentifier` (the entry goes when it closes).
        let connection: PostgresConnection
        let loop: ConnectionLoop
        var names: [Key: String] = [:]
        var named = 0
    }

    let capacity: Int
    private let entries = Mutex<[ObjectIdentifier: Entry]>([:])
    /// Names are unique across the engine's connections, so that no name ever stands for two
    /// statements.
    private let nextName = Atomic<Int>(0)

    init(capacity: Int) {
        self.capacity = capacity
    }

    /// How to run `query` prepared on `connection`; `nil` to run it unnamed (the cache is off
    /// or full, or the bound values' types cannot be read).
    func plan(for query: PostgresQuery, on connection: PostgresConnection) -> Plan? {
        guard capacity > 0, let types = query.binds.dataTypes else { return nil }
        let key = Key(sql: query.sql, types: types)
        let id = ObjectIdentifier(connection)
        let (plan, isNewEntry) = entries.withLock { entries -> (Plan?, Bool) in
            let existing = entries.removeValue(forKey: id)
            var entry = existing ?? Entry(connection: connection, loop: ConnectionLoop(connection.eventLoop))
            defer { entries[id] = entry }
            if let name = entry.names[key] {
                return (Plan(key: key, name: name, isFirstUse: false, loop: entry.loop), existing == nil)
            }
            guard entry.named < capacity else { return (nil, existing == nil) }
            let name = "contextdb_\(nextName.add(1, ordering: .relaxed).oldValue)"
            entry.named += 1
            entry.names[key] = name
            return (Plan(key: key, name: name, isFirstUse: true, loop: entry.loop), existing == nil)
        }
        if isNewEntry { forgetWhenClosed(connection) }
        return plan
    }

    /// Drops the connection's entry once it closes (registered outside the lock: on a closed
    /// connection the callback may run at once).
    private func forgetWhenClosed(_ connection: PostgresConnection) {
        let id = ObjectIdentifier(connection)
        connection.closeFuture.whenComplete { [self] _ in
            entries.withLock { _ = $0.removeValue(forKey: id) }
        }
    }

    /// Whether `error` means the server's plan for a cached statement no longer fits (a schema
    /// change altered its result: SQLSTATE 0A000, `cached plan must not change result type`).
    static func isStalePlan(_ error: any Error) -> Bool {
        let info = ((error as? DBError)?.underlying as? PSQLError ?? error as? PSQLError)?.serverInfo
        return info?[.sqlState] == "0A000" && info?[.message]?.contains("cached plan") == true
    }

    /// A prepared run failed with `error`: forget the statement when the server may not have
    /// prepared it or no longer runs it, so that its next run prepares it under a new name.
    ///
    /// Preparing (`Parse`) fails for reasons in the SQL and the schema — SQLSTATE class 42
    /// (syntax, an unknown table or column), 0A000, or anything else on a first run but the
    /// errors of running it — and PostgresNIO then refuses the name for good; a statement the
    /// server lost (`prepared statement … does not exist`, 26000: the app
    /// ran `DEALLOCATE`) takes every name of the connection with it. Errors of running it (bad data,
    /// a unique violation, a serialization failure: classes 22, 23, 40) leave it prepared, and its
    /// name kept, so they do not use up the connection's names.
    func failed(_ plan: Plan, on connection: PostgresConnection, error: any Error) {
        guard let state = (error as? PSQLError)?.serverInfo?[.sqlState] else { return }  // not the server's: the connection is lost
        let forgetsAll = state == "26000"
        let ofRunning = ["22", "23", "40"].contains(state.prefix(2))  // data, constraints, serialization
        let unprepared = state.hasPrefix("42") || state == "0A000" || (plan.isFirstUse && !ofRunning)
        guard forgetsAll || unprepared else { return }
        let id = ObjectIdentifier(connection)
        entries.withLock { entries in
            if forgetsAll {
                entries[id]?.names.removeAll()
            } else if entries[id]?.names[plan.key] == plan.name {
                entries[id]?.names[plan.key] = nil
            }
        }
    }

    /// Runs a planned statement on its connection and collects the rows.
    func run(_ plan: Plan, _ query: PostgresQuery, on connection: PostgresConnection, logger: Logger) async throws -> [PostgresRow] {
        // The identity is a task-local of this task, so it is there on the loop too.
        try await CachedStatement.$identity.withValue(CachedStatement.Identity(name: plan.name, sql: query.sql)) {
            try await plan.loop.execute(CachedStatement(bindings: query.binds), on: connection, logger: logger)
        }
    }
}

/// The one `PostgresPreparedStatement` type for every cached statement.
///
/// PostgresNIO 1.33.2 reads a prepared statement's name and SQL from its type (static
/// properties), once, synchronously, when the statement is sent; this type answers with the
/// identity set around that call (a task-local); read anywhere else, it traps rather than name a
/// wrong statement. The parameter types are the bound values' own.
struct CachedStatement: PostgresPreparedStatement {
    struct Identity: Sendable {
        let name: String
        let sql: String
    }

    typealias Row = PostgresRow

    @TaskLocal static var identity: Identity?

    static var name: String { current.name }
    static var sql: String { current.sql }

    private static var current: Identity {
        guard let identity else {
            preconditionFailure("CachedStatement read outside PostgresStatementCache.run: this PostgresNIO reads a prepared statement's name where ContextDB cannot set it")
        }
        return identity
    }

    let bindings: PostgresBindings

    func makeBindings() throws -> PostgresBindings { bindings }
    func decodeRow(_ row: PostgresRow) throws -> PostgresRow { row }
}

/// Runs PostgresNIO calls on a connection's event loop.
///
/// PostgresNIO 1.33.2 runs `execute` in its caller's isolation (`nonisolated(nonsending)`), and
/// writes the statement before its first suspension. From this actor, whose executor is the
/// event loop, that write happens on the loop right after the `isClosed` check: the channel
/// cannot close in between, so the statement reaches a live handler, which answers it or
/// fails it — never the dropped write that waits forever.
actor ConnectionLoop {
    private let eventLoop: any EventLoop

    init(_ eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    nonisolated var unownedExecutor: UnownedSerialExecutor { eventLoop.executor.asUnownedSerialExecutor() }

    /// Runs a cached statement (named by `CachedStatement.identity`) and collects its rows.
    ///
    /// The body calls PostgresNIO directly, not from a closure: only this actor-isolated code
    /// is sure to run on the loop (a closure that captures nothing isolated would not be).
    /// - Throws: ``StatementNotSent`` when the connection is closed; PostgresNIO's error otherwise.
    func execute(_ statement: CachedStatement, on connection: PostgresConnection, logger: Logger) async throws -> [PostgresRow] {
        eventLoop.assertInEventLoop()
        guard !connection.isClosed else { throw StatementNotSent() }
        let sequence = try await connection.execute(statement, logger: logger)
        var rows: [PostgresRow] = []
        for try await row in sequence {
            rows.append(row)
        }
        return rows
    }
}

extension PostgresBindings {
    /// The PostgreSQL type of each bound value, in order; `nil` when it cannot be read.
    ///
    /// PostgresNIO 1.33.2 keeps them internal (`metadata[i].dataType`), so they are read by
    /// reflection; a version that changed that shape turns the statement cache off rather than
    /// guess.
    var dataTypes: [PostgresDataType]? {
        if count == 0 { return [] }
        guard let metadata = Mirror(reflecting: self).descendant("metadata") as? [Any] else { return nil }
        var types: [PostgresDataType] = []
        types.reserveCapacity(metadata.count)
        for element in metadata {
            guard let type = Mirror(reflecting: element).descendant("dataType") as? PostgresDataType else { return nil }
            types.append(type)
        }
        return types
    }
}
