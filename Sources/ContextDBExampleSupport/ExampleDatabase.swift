import ContextDB
import ContextDBPostgres
import Logging
import PostgresNIO

/// The example's database on PostgresNIO (`DATABASE_ENGINE` unset or `postgresnio`).
public typealias ExampleDatabase = ExampleDatabaseOf<PostgresEngine>

/// The example's two connects, routed by a topology that probes every host of the URI: the
/// primary connect follows the current primary (also after a promotion); the replica connect
/// spreads reads over fit replicas, honours read-your-own-writes, and falls back to the primary.
/// `Engine` is PostgresNIO's (``ExampleDatabase``) or libpq's.
public struct ExampleDatabaseOf<Engine: ExampleEngine>: Sendable {
    /// The local cluster of `scripts/pg-cluster.sh`, used when `DATABASE_URL` is not set.
    public static var localClusterURL: String {
        "postgresql://contextdb:contextdb@127.0.0.1:25432,127.0.0.1:25433/contextdb?sslmode=disable"
    }

    /// The example's statement deadline: a statement still running after it is cancelled, and
    /// its connection closed a second later if the server answers neither (a frozen host).
    public static var statementTimeout: Duration { .seconds(5) }
    /// The example's lease deadline: with the statement deadline, no request waits more than
    /// about 10 seconds on a frozen host.
    public static var leaseTimeout: Duration { .seconds(4) }
    /// The example's topology settings: the library's, but a write that finds no primary (a
    /// failover under way) waits up to 10 s for one instead of failing at once.
    public static var topologyConfiguration: PostgresTopology.Configuration {
        var configuration = PostgresTopology.Configuration()
        configuration.primaryWaitTimeout = .seconds(10)
        return configuration
    }

    public let topology: PostgresTopology
    public let primary: DBConnect<Engine>
    public let replica: DBConnect<Engine>
    /// The replica lag limits of token-less reads (reported by `/topology`).
    public let maximumLagBytes: UInt64?
    public let maximumLag: Duration?

    /// - Parameters:
    ///   - url: A libpq URI naming every host of the cluster, in any order: roles come from probing.
    ///   - maximumLagBytes: The most WAL bytes a replica may lag to serve a read without a token.
    ///     Default 16 MiB.
    ///   - maximumLag: The most a replica's replay may lag in time to serve a read without a
    ///     token. Default 10 seconds.
    ///   - resetsSessionState: Reset each released connection before the next lease (the
    ///     library's default); `false` to measure what the reset costs.
    ///   - readYourWrites: Record each write's WAL position so later reads wait for it (two more
    ///     round trips per committed write); `false` for the plain cost, as in the HTTP benchmark.
    ///   - instrumentation: Where the connects' and the topology's metrics and spans go.
    public init(
        url: String,
        maximumConnections: Int = 20,
        maximumLagBytes: UInt64? = PostgresTopology.defaultMaximumLagBytes,
        maximumLag: Duration? = PostgresTopology.defaultMaximumLag,
        readYourWrites: Bool = true,
        resetsSessionState: Bool = true,
        topology configuration: PostgresTopology.Configuration = ExampleDatabase.topologyConfiguration,
        instrumentation: DBInstrumentation = DBInstrumentation(),
        logger: Logger
    ) throws {
        self.maximumLagBytes = maximumLagBytes
        self.maximumLag = maximumLag
        topology = try PostgresTopology(url: url, configuration: configuration, logger: logger, instrumentation: instrumentation)
        primary = try Engine.exampleConnect(
            label: "primary", url: url, options: DBSessionOptions(), maximumConnections: maximumConnections,
            leaseTimeout: Self.leaseTimeout, statementTimeout: Self.statementTimeout, resetsSessionState: resetsSessionState,
            readYourWrites: readYourWrites, logger: logger, chooseHost: topology.primaryHook(for: Engine.self),
            instrumentation: instrumentation
        )
        replica = try Engine.exampleConnect(
            label: "replica", url: url, options: DBSessionOptions(readOnly: true), maximumConnections: maximumConnections,
            leaseTimeout: Self.leaseTimeout, statementTimeout: Self.statementTimeout, resetsSessionState: resetsSessionState,
            readYourWrites: false, logger: logger,
            chooseHost: topology.replicaHook(for: Engine.self, maximumLagBytes: maximumLagBytes, maximumLag: maximumLag),
            instrumentation: instrumentation
        )
    }

    /// The database the examples' environment describes: `DATABASE_URL` (default
    /// ``localClusterURL``), `REPLICA_MAX_LAG_BYTES` (default 16 MiB), `REPLICA_MAX_LAG_SECONDS`
    /// (default 10), `READ_YOUR_WRITES=off` and `RESET_SESSION_STATE=off`.
    /// - Parameters:
    ///   - environment: The process's environment variables.
    ///   - instrumentation: Where the connects' and the topology's metrics and spans go.
    ///   - logger: Where the connects and the topology log.
    /// - Throws: `DBError` for a malformed `DATABASE_URL`.
    public init(environment: [String: String], instrumentation: DBInstrumentation = DBInstrumentation(), logger: Logger) throws {
        try self.init(
            url: environment["DATABASE_URL"] ?? Self.localClusterURL,
            maximumLagBytes: environment["REPLICA_MAX_LAG_BYTES"].flatMap { UInt64($0) } ?? PostgresTopology.defaultMaximumLagBytes,
            maximumLag: environment["REPLICA_MAX_LAG_SECONDS"].flatMap { Int64($0) }.map { Duration.seconds($0) }
                ?? PostgresTopology.defaultMaximumLag,
            readYourWrites: environment["READ_YOUR_WRITES"] != "off",
            resetsSessionState: environment["RESET_SESSION_STATE"] != "off",
            instrumentation: instrumentation,
            logger: logger
        )
    }

    /// Probes the cluster once — beside the topology's own first round, so start-up does not
    /// hinge on that round's time bound — then creates the tables. Runs once the services run.
    public func start() async throws {
        await topology.refresh()
        try await createTables()
    }

    /// The example's tables, created when missing.
    public static var schema: [String] {
        [
            "CREATE TABLE IF NOT EXISTS example (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), text text)",
            "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, text text NOT NULL)",
        ]
    }

    /// Creates the example's tables when they are missing.
    public func createTables() async throws {
        for attempt in 1...3 {
            do {
                try await primary.withTransaction { session in
                    for statement in Self.schema { try await Engine.exampleExecute(statement, in: session) }
                }
                return
            } catch let error as DBError where error.sqlState == "23505" && attempt < 3 {
                continue  // another instance created them at the same moment
            }
        }
    }
}
