import ContextDB
import ContextDBPostgres
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// The example's two connects: the primary for writes and a read-only replica connect that
/// spreads sessions over the replica hosts.
struct ExampleDatabase: Sendable {
    /// The local cluster of `scripts/pg-cluster.sh`, used when `DATABASE_URL` is not set.
    static let localClusterURL =
        "postgresql://contextdb:contextdb@127.0.0.1:55432,127.0.0.1:55433/contextdb?sslmode=disable"

    let primary: DBConnect<PostgresEngine>
    let replica: DBConnect<PostgresEngine>

    /// - Parameter url: A libpq URI; the first host is the primary, the others replicas. With a
    ///   single host, the replica connect reads from it too (still read-only).
    init(url: String, maximumConnections: Int = 20, logger: Logger) throws {
        let parsed = try PostgresURL(url)
        primary = try DBConnect(label: "primary", url: url, maximumConnections: maximumConnections, logger: logger)
        let replicaHosts = parsed.endpoints.dropFirst().map(\.description)
        let turn = RoundRobin()
        replica = try DBConnect(
            label: "replica", url: url, options: DBSessionOptions(readOnly: true),
            maximumConnections: maximumConnections, logger: logger,
            beforeCreateSession: { connect in
                guard !replicaHosts.isEmpty else { return }
                try connect.changeHost(replicaHosts[turn.next() % replicaHosts.count])
            }
        )
    }

    /// Creates the example's tables when they are missing.
    func createTables() async throws {
        for attempt in 1...3 {
            do {
                try await primary.withTransaction { session in
                    try await session.execute(
                        "CREATE TABLE IF NOT EXISTS example (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), text text)"
                    )
                    try await session.execute(
                        "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, text text NOT NULL)"
                    )
                }
                return
            } catch let error as DBError where error.sqlState == "23505" && attempt < 3 {
                continue  // another instance created them at the same moment
            }
        }
    }

    func close() async {
        await primary.close()
        await replica.close()
    }
}

/// A lock-free counter for round-robin choices.
final class RoundRobin: Sendable {
    private let counter = Atomic<Int>(0)
    func next() -> Int { counter.add(1, ordering: .relaxed).oldValue & Int.max }
}

/// Closes the connects when the application shuts down.
struct DatabaseService: Service {
    let database: ExampleDatabase

    func run() async throws {
        try? await gracefulShutdown()
        await database.close()
    }
}

/// The WAL position of the request's last committed write, for the `X-WAL-LSN` cookie.
enum CommittedWALPosition: DBContextKey {
    typealias Value = String
}

extension ExampleDatabase {
    /// Captures the WAL position of a transaction that wrote, as the Python original's example does.
    @Sendable static func captureWALPosition(_ session: any AnyDBSession) async throws {
        guard let session = session as? DBSession<PostgresEngine>, !session.connect.options.readOnly else { return }
        let lsn = try await session.queryValue(
            "SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL THEN pg_current_wal_lsn()::text END",
            as: String?.self
        )
        if let lsn = lsn ?? nil { DBContext.current?[CommittedWALPosition.self] = lsn }
    }
}
