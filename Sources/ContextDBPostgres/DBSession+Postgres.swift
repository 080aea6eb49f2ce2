import ContextDB
import Logging
import PostgresNIO

extension DBSession where Engine == PostgresEngine {
    /// Runs a query and returns all its rows.
    ///
    /// Interpolated values are sent as bound parameters, never spliced into the SQL:
    /// `session.query("SELECT text FROM items WHERE id = \(id)")`.
    /// The first statement of a session leases a connection and begins a transaction.
    /// - Parameters:
    ///   - query: The statement.
    ///   - logger: Where PostgresNIO logs the query. Default: the engine's logger.
    /// - Returns: Every row, already read off the connection.
    /// - Throws: ``DBError`` — ``DBError/Code/readOnlySession`` for a write in a read-only session,
    ///   ``DBError/Code/queryFailed`` (with the server's message and SQLSTATE) for other server errors,
    ///   ``DBError/Code/connectionLost`` when the server closed the connection (the transaction's
    ///   work is gone; see ``DBSession/withLeasedConnection(isolation:_:)``),
    ///   ``DBError/Code/statementTimeout`` past the connect's statement timeout.
    @discardableResult
    public func query(_ query: PostgresQuery, logger: Logger? = nil) async throws -> [PostgresRow] {
        try await withLeasedConnection { engine, connection in
            do {
                return try await engine.query(query, on: connection, logger: logger ?? engine.logger).rows
            } catch {
                throw mapped(error)
            }
        }
    }

    /// Runs a statement and discards any rows it returns.
    /// - Parameter query: The statement; interpolated values are bound parameters.
    /// - Throws: See ``query(_:logger:)``.
    public func execute(_ query: PostgresQuery, logger: Logger? = nil) async throws {
        try await self.query(query, logger: logger)
    }

    /// Runs a query and returns its first row, or `nil` when it returns none.
    /// - Parameter query: The statement; interpolated values are bound parameters.
    /// - Throws: See ``query(_:logger:)``.
    public func queryFirst(_ query: PostgresQuery, logger: Logger? = nil) async throws -> PostgresRow? {
        try await self.query(query, logger: logger).first
    }

    /// Runs a query and decodes the first column of its first row, or returns `nil` when it
    /// returns no row.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - type: The Swift type of the value.
    /// - Throws: See ``query(_:logger:)``, or a decoding error when the column has another type.
    public func queryValue<Value: PostgresDecodable>(
        _ query: PostgresQuery, as type: Value.Type = Value.self, logger: Logger? = nil
    ) async throws -> Value? {
        try await self.query(query, logger: logger).first?.decode(Value.self)
    }

    private func mapped(_ error: any Error) -> any Error {
        if var error = error as? DBError {
            error.connect = connectLabel
            return error
        }
        guard let error = error as? PSQLError, error.code == .server else { return error }
        let state = error.serverInfo?[.sqlState] ?? "?"
        let message = error.serverInfo?[.message] ?? "no message"
        if state == "25006" {
            return DBError(
                .readOnlySession,
                "this session is read-only (\(message)); send writes through the primary connect",
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
        (underlying as? PSQLError)?.serverInfo?[.sqlState]
    }
}
