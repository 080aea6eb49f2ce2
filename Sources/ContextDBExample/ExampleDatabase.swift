import ContextDB
import ContextDBPostgres
import Logging
import PostgresNIO
import ServiceLifecycle

/// The example's two connects, routed by a topology that probes every host of the URI: the
/// primary connect follows the current primary (also after a promotion); the replica connect
/// spreads reads over fit replicas, honours read-your-own-writes, and falls back to the primary.
struct ExampleDatabase: Sendable {
    /// The local cluster of `scripts/pg-cluster.sh`, used when `DATABASE_URL` is not set.
    static let localClusterURL =
        "postgresql://contextdb:contextdb@127.0.0.1:55432,127.0.0.1:55433/contextdb?sslmode=disable"

    let topology: PostgresTopology
    let primary: DBConnect<PostgresEngine>
    let replica: DBConnect<PostgresEngine>

    /// - Parameters:
    ///   - url: A libpq URI naming every host of the cluster, in any order: roles come from probing.
    ///   - maximumLagBytes: The most a replica may lag to serve a read without a token.
    ///   - readYourWrites: Record each write's WAL position so later reads wait for it (two more
    ///     round trips per committed write); `false` for the plain cost, as in the HTTP benchmark.
    init(
        url: String,
        maximumConnections: Int = 20,
        maximumLagBytes: UInt64? = nil,
        readYourWrites: Bool = true,
        topology configuration: PostgresTopology.Configuration = PostgresTopology.Configuration(),
        logger: Logger
    ) throws {
        topology = try PostgresTopology(url: url, configuration: configuration, logger: logger)
        primary = try DBConnect(
            label: "primary", url: url, maximumConnections: maximumConnections, readYourWrites: readYourWrites,
            logger: logger, beforeCreateSession: topology.primaryHook()
        )
        replica = try DBConnect(
            label: "replica", url: url, options: DBSessionOptions(readOnly: true),
            maximumConnections: maximumConnections, logger: logger,
            beforeCreateSession: topology.replicaHook(maximumLagBytes: maximumLagBytes)
        )
    }

    /// Probes the cluster once, so the first request finds a snapshot, and creates the tables.
    func start() async throws {
        await topology.refresh()
        try await createTables()
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

/// Closes the connects when the application shuts down.
struct DatabaseService: Service {
    let database: ExampleDatabase

    func run() async throws {
        try? await gracefulShutdown()
        await database.close()
    }
}
