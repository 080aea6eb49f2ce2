import ContextDB
import ContextDBPostgres

extension LibPQServerError: PostgresServerErrorInfo {}

extension DBSession where Engine == LibPQEngine {
    /// Runs a statement and returns all its rows.
    ///
    /// Interpolated values are bound parameters, never spliced into the SQL:
    /// `session.query("SELECT text FROM items WHERE id = \(id)")`. The first statement of a
    /// session leases a connection and begins a transaction.
    /// - Parameter query: The statement.
    /// - Returns: Every row, already read off the connection.
    /// - Throws: `DBError` — `DBError.Code.readOnlySession` for a write in a read-only session,
    ///   `DBError.Code.queryFailed` with the server's message (and `sqlState`),
    ///   `DBError.Code.connectionLost` when the connection was lost,
    ///   `DBError.Code.statementTimeout` past the engine's statement timeout.
    @discardableResult
    public func query(_ query: LibPQQuery) async throws -> [LibPQRow] {
        try await withLeasedConnection { engine, connection in
            try await instrumentStatement(Self.operationName(of: query.sql), text: { query.sql }) {
                do {
                    let result = try await engine.run(query.sql, query.parameters, on: connection)
                    return result.rows.map { LibPQRow(columns: result.columns, values: $0) }
                } catch var error as DBError {
                    if error.code == .queryFailed, let server = error.underlying as? LibPQServerError {
                        error = serverError(sqlState: server.sqlState ?? "?", message: server.message, underlying: server)
                    }
                    error.connect = connectLabel
                    error.host = host
                    throw error
                }
            }
        }
    }

    /// Runs a statement and discards any rows it returns.
    /// - Parameter query: The statement; interpolated values are bound parameters.
    /// - Throws: See ``query(_:)``.
    public func execute(_ query: LibPQQuery) async throws {
        try await self.query(query)
    }

    /// Runs a query and decodes the first column of its first row, or returns `nil` when it
    /// returns no row.
    /// - Parameters:
    ///   - query: The statement; interpolated values are bound parameters.
    ///   - type: The Swift type of the value.
    /// - Throws: See ``query(_:)``, or `DBError.Code.queryFailed` when the column is not a `type`.
    public func queryValue<Value: LibPQDecodable>(_ query: LibPQQuery, as type: Value.Type = Value.self) async throws -> Value? {
        try await self.query(query).first?.decode(Value.self)
    }

}
