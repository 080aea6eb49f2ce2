import ContextDB
import Logging
import PostgresNIO

extension DBSession where Engine == PostgresEngine {
    /// Runs a query and returns all its rows.
    ///
    /// Interpolated values are sent as bound parameters, never spliced into the SQL:
    /// `session.query("SELECT text FROM items WHERE id = \(id)")`.
    /// The first statement of a session leases a connection and begins a transaction.
    ///
    /// The statement is prepared on the connection and reused by later sessions on it (see
    /// ``PostgresEngine/statementCacheSize``); `prepared: false` runs it unnamed — for SQL that is
    /// built anew each time (a varying `IN` list, `unescaped` pieces), which would only fill the
    /// cache.
    /// - Parameters:
    ///   - query: The statement.
    ///   - logger: Where PostgresNIO logs the query. Default: the engine's logger.
    ///   - prepared: Prepare the statement on the connection and reuse it. Default `true`.
    ///
    /// In a session of a read-only connect, a transaction's first statement that fails with a
    /// lost connection or a recovery conflict (SQLSTATE 40001) runs once more on the session's
    /// next candidate host — the next fit replica, then the primary — with a log line at info
    /// and a count in `contextdb.failovers`: no row had reached the caller, so nothing is seen
    /// twice. Nothing else is ever retried.
    /// - Returns: Every row, already read off the connection.
    /// - Throws: `DBError` — `DBError.Code.readOnlySession` for a write in a read-only session,
    ///   `DBError.Code.queryFailed` (with the server's message and SQLSTATE) for other server errors,
    ///   `DBError.Code.connectionLost` when the server closed the connection (the transaction's
    ///   work is gone; see `DBSession.withLeasedConnection(isolation:_:)`),
    ///   `DBError.Code.statementTimeout` past the connect's statement timeout.
    @discardableResult
    public func query(_ query: PostgresQuery, logger: Logger? = nil, prepared: Bool = true) async throws -> [PostgresRow] {
        var firstOfTransaction = false
        var engineLogger: Logger?
        do {
            return try await rows(query, logger: logger, prepared: prepared) { began, logger in
                firstOfTransaction = began
                engineLogger = logger
            }
        } catch let error as DBError where firstOfTransaction && Self.isRetryableRead(error) {
            // A read-only transaction's first statement, no row returned: safe to run on the
            // next fit host (then the primary). Once; nothing else is ever retried.
            let from = host
            guard await moveToNextHost(after: error, hostIsSuspect: error.code == .connectionLost) else { throw error }
            engineLogger?.info("retrying a read on the next host", metadata: [
                "db.connect": "\(connectLabel)", "db.host": "\(from)", "contextdb.failover.to": "\(host)", "error.type": "\(error.code)",
            ])
            return try await rows(query, logger: logger, prepared: prepared) { _, _ in }
        }
    }

    /// A failure of a read-only transaction's first statement that another host may not have:
    /// a lost connection, or a recovery conflict on a standby (SQLSTATE 40001).
    static func isRetryableRead(_ error: DBError) -> Bool {
        error.code == .connectionLost || (error.code == .queryFailed && error.sqlState == "40001")
    }

    /// Runs `query` in the session's transaction, telling `began` whether it is the
    /// transaction's first statement, and the engine's logger.
    private func rows(
        _ query: PostgresQuery, logger: Logger?, prepared: Bool, began: (Bool, Logger) -> Void
    ) async throws -> [PostgresRow] {
        try await withLeasedConnection { engine, connection, beganTransaction in
            began(beganTransaction, engine.logger)
            let logger = logger ?? engine.logger
            do {
                return try await instrumentStatement(Self.operationName(of: query.sql), text: { query.sql }) {
                    do {
                        return try await engine.rows(query, on: connection, logger: logger, prepared: prepared)
                    } catch where beganTransaction && PostgresStatementCache.isStalePlan(error) {
                        throw error  // retried below
                    } catch {
                        throw mapped(error)  // timed and traced with its DBError code
                    }
                }
            } catch where beganTransaction && PostgresStatementCache.isStalePlan(error) {
                // A schema change altered what the cached statement returns, and nothing of the
                // transaction ran before it: start the transaction again and run the statement
                // prepared anew. Once.
                engine.logger.debug("a cached statement's plan went stale; retrying it in a new transaction")
                do {
                    try await engine.execute(.rollback, on: connection)
                    try await engine.execute(.begin(connect.options), on: connection)
                    return try await engine.rows(query, on: connection, logger: logger, prepared: prepared)
                } catch {
                    throw mapped(error)
                }
            } catch {
                throw mapped(error)
            }
        }
    }

    /// Runs a statement and discards any rows it returns.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - logger: Where PostgresNIO logs the statement. Default: the engine's logger.
    ///   - prepared: Prepare the statement on the connection and reuse it. Default `true`.
    /// - Throws: See ``query(_:logger:prepared:)``.
    public func execute(_ query: PostgresQuery, logger: Logger? = nil, prepared: Bool = true) async throws {
        try await self.query(query, logger: logger, prepared: prepared)
    }

    /// Runs a query and returns its first row, or `nil` when it returns none.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - logger: Where PostgresNIO logs the statement. Default: the engine's logger.
    ///   - prepared: Prepare the statement on the connection and reuse it. Default `true`.
    /// - Throws: See ``query(_:logger:prepared:)``.
    public func queryFirst(_ query: PostgresQuery, logger: Logger? = nil, prepared: Bool = true) async throws -> PostgresRow? {
        try await self.query(query, logger: logger, prepared: prepared).first
    }

    /// Runs a query and decodes the first column of its first row, or returns `nil` when it
    /// returns no row.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - type: The Swift type of the value.
    ///   - logger: Where PostgresNIO logs the statement. Default: the engine's logger.
    ///   - prepared: Prepare the statement on the connection and reuse it. Default `true`.
    /// - Throws: See ``query(_:logger:prepared:)``, or a decoding error when the column has another type.
    public func queryValue<Value: PostgresDecodable>(
        _ query: PostgresQuery, as type: Value.Type = Value.self, logger: Logger? = nil, prepared: Bool = true
    ) async throws -> Value? {
        try await self.query(query, logger: logger, prepared: prepared).first?.decode(Value.self)
    }


    private func mapped(_ error: any Error) -> any Error {
        if var error = error as? DBError {
            error.connect = connectLabel
            return error
        }
        guard let error = error as? PSQLError, error.code == .server else { return error }
        return serverError(sqlState: error.serverInfo?[.sqlState] ?? "?", message: error.serverInfo?[.message] ?? "no message", underlying: error)
    }
}

extension DBSession {
    /// A statement's `db.operation.name`: its first keyword, upper-cased (`SELECT`, `INSERT`,
    /// `WITH`…), or `"statement"` when it starts with none.
    package static func operationName(of sql: String) -> String {
        let keyword = sql.drop { $0.isWhitespace || $0 == "(" }.prefix { $0.isLetter }
        return keyword.isEmpty ? "statement" : keyword.uppercased()
    }

    /// The `DBError` for a statement the server rejected with `sqlState` — for PostgreSQL engine
    /// modules: 25006 (read-only transaction) is `writesPrevented`, `readOnlySession` or, on a
    /// connect that may write, `noHostAvailable` (the host became a standby); the rest is
    /// `queryFailed` with the server's message and SQLSTATE.
    package func serverError(sqlState state: String, message: String, underlying error: any Error) -> DBError {
        if state == "25006", transactionPreventsWrites {
            return DBError(
                .writesPrevented,
                "writes are prevented on this connect (DBConnect.preventsWrites or writesPreventedEverywhere): \(message)",
                connect: connectLabel, host: host, underlying: error
            )
        }
        if state == "25006", connect.options.readOnly {
            return DBError(
                .readOnlySession,
                "this session is read-only (\(message)); send writes through the primary connect",
                connect: connectLabel, host: host, underlying: error
            )
        }
        if state == "25006" {
            // A connect that may write reached a host that may not: a primary demoted by a
            // failover, or one set read-only. Not the request's fault; worth a retry.
            return DBError(
                .noHostAvailable,
                "the host is read-only now (\(message)): a standby, or default_transaction_read_only — a failover may be under way",
                connect: connectLabel, host: host, underlying: error
            )
        }
        if state == "0A000", message.contains("cached plan") {
            return DBError(
                .queryFailed,
                "the server rejected the statement: \(message) (SQLSTATE \(state)); a schema change altered what a prepared statement returns — it is prepared anew on its next run, retry the transaction",
                connect: connectLabel, host: host, underlying: error
            )
        }
        return DBError(
            .queryFailed, "the server rejected the statement: \(message) (SQLSTATE \(state))",
            connect: connectLabel, host: host, underlying: error
        )
    }
}

extension DBError {
    /// The PostgreSQL SQLSTATE of the server error behind this one (`"23505"` for a unique
    /// violation), or `nil` when the server did not cause it.
    public var sqlState: String? {
        (underlying as? PSQLError)?.serverInfo?[.sqlState] ?? (underlying as? any PostgresServerErrorInfo)?.sqlState
    }
}

/// A server error of another PostgreSQL engine module (libpq's), for ``ContextDB/DBError/sqlState``.
package protocol PostgresServerErrorInfo: Error {
    var sqlState: String? { get }
}
