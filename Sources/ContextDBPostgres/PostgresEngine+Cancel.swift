import ContextDB
import Logging
import PostgresNIO
import Synchronization

/// Cancel requests for statements past ``PostgresEngine/statementTimeout``: the backend process
/// IDs of the pool's connections, and the engine's own connection that sends
/// `pg_cancel_backend`.
extension PostgresEngine {
    /// Asks the server to cancel what the connection's backend runs (`pg_cancel_backend`, on
    /// the engine's own cancel connection, opened on first use and kept; PostgreSQL docs, "Server
    /// Signaling Functions"). Connect and query are each bounded by ``cancelGrace``. Returns
    /// whether the server confirmed the request; when it did not, the caller closes the
    /// statement's connection rather than risk a late cancel hitting its next statement.
    ///
    /// > Note: The cancel names the backend process, so it needs a direct session to the
    /// > server; behind a pooler in transaction mode (PgBouncer) it may reach another client's
    /// > backend. Leave ``statementTimeout`` off there, or use the pooler's own `query_timeout`.
    func cancelStatement(on connection: PostgresConnection) async -> Bool {
        guard let pid = backendPIDs[connection] else { return false }
        logger.info("statement timeout: sending a cancel request", metadata: ["db.backend_pid": "\(pid)"])
        guard let control = await cancelConnection() else { return false }
        do {
            return try await control.guardedQuery(
                "SELECT pg_cancel_backend(\(pid))", host: endpoint.description, logger: logger,
                timeout: Self.cancelGrace, grace: .zero
            ).first?.decode(Bool.self) ?? false
        } catch {
            logger.debug("the cancel request failed", metadata: ["error": "\(String(reflecting: error))"])
            return false
        }
    }

    /// The engine's cancel connection, opened when missing or closed; `nil` when it cannot be had.
    private func cancelConnection() async -> PostgresConnection? {
        guard case .success(var configuration) = connectionConfiguration else { return nil }
        configuration.options.connectTimeout = TimeAmount(Self.cancelGrace)  // a frozen host never delays a statement longer
        let cancelConfiguration = configuration
        for _ in 0..<2 {  // a kept connection the server closed since: connect once more
            let task = canceller.withLock { state -> Task<PostgresConnection?, Never>? in
                guard !state.closed else { return nil }
                if let connecting = state.connecting { return connecting }
                // One connect at a time, shared by every concurrent cancel.
                let connecting = Task { [logger] in
                    try? await PostgresConnection.connect(configuration: cancelConfiguration, id: 0, logger: logger)
                }
                state.connecting = connecting
                return connecting
            }
            guard let task else { return nil }
            let connection = await task.value
            if let connection, !connection.isClosed {
                if canceller.withLock({ $0.closed }) {
                    try? await connection.close()  // opened while the engine shut down
                    return nil
                }
                return connection
            }
            canceller.withLock { state in
                if state.connecting == task { state.connecting = nil }
            }
            guard connection != nil else { return nil }  // the connect failed: no second try now
        }
        return nil
    }
}

/// The backend process IDs of an engine's connections, for cancel requests. An entry goes
/// when its connection closes.
final class BackendPIDs: Sendable {
    /// By connection; the entry keeps the connection, so that no new connection takes its
    /// identifier (and a stale process ID) while it closes.
    private let pids = Mutex<[ObjectIdentifier: (connection: PostgresConnection, pid: Int32)]>([:])

    subscript(connection: PostgresConnection) -> Int32? { pids.withLock { $0[ObjectIdentifier(connection)]?.pid } }

    /// Asks a new connection for its backend process ID (`pg_backend_pid()`); without an
    /// answer within `timeout`, no cancel request can name it.
    func learn(_ connection: PostgresConnection, host: String, logger: Logger, timeout: Duration) async {
        let id = ObjectIdentifier(connection)
        guard let pid = try? await connection.guardedQuery(
            "SELECT pg_backend_pid()", host: host, logger: logger, timeout: timeout
        ).first?.decode(Int32.self) else { return }
        pids.withLock { $0[id] = (connection, pid) }
        connection.closeFuture.whenComplete { [self] _ in
            pids.withLock { _ = $0.removeValue(forKey: id) }
        }
    }
}
