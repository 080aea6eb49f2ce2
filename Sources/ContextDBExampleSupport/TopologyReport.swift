import ContextDBPostgres

/// `GET /topology`'s answer: what the routing sees — every host, its role, health, lag in bytes
/// and seconds, its WAL receiver's status, and why a replica may not serve token-less reads.
public struct TopologyReport: Sendable {
    let database: (topology: PostgresTopology, maximumLagBytes: UInt64?, maximumLag: Duration?)

    /// The report of `database`'s topology and lag limits.
    public init<Engine: ExampleEngine>(database: ExampleDatabaseOf<Engine>) {
        self.database = (database.topology, database.maximumLagBytes, database.maximumLag)
    }

    /// One host of the report.
    public struct Host: Codable, Sendable {
        public let host: String
        public let role: String
        public let healthy: Bool
        public let lagBytes: UInt64?
        public let lagSeconds: Double?
        public let walReceiver: String?
        /// Why a replica may not serve token-less reads now; absent when it may.
        public let unfit: String?

        enum CodingKeys: String, CodingKey {
            case host, role, healthy, unfit
            case lagBytes = "lag_bytes"
            case lagSeconds = "lag_seconds"
            case walReceiver = "wal_receiver"
        }
    }

    /// `GET /health/live`: the topology is probing.
    /// - Throws: ``ExampleFailure`` 503 when it is not.
    public func live() throws -> ItemStore.Health {
        guard database.topology.isLive else { throw ExampleFailure(status: 503, message: "the topology is not probing") }
        return ItemStore.Health(status: "live")
    }

    /// `GET /health/ready`: a primary is known and reads have a host (a fit replica, or the
    /// primary as fallback).
    /// - Throws: ``ExampleFailure`` 503 saying why not.
    public func ready() throws -> ItemStore.Health {
        let readiness = database.topology.readiness(maximumLagBytes: database.maximumLagBytes, maximumLag: database.maximumLag)
        guard readiness.isReady else { throw ExampleFailure(status: 503, message: readiness.reason ?? "not ready") }
        return ItemStore.Health(status: "ready")
    }

    /// Every host as the topology's last probe saw it.
    public var hosts: [Host] {
        database.topology.snapshot.hosts.map { host in
            Host(
                host: host.endpoint.description, role: host.role.rawValue, healthy: host.isHealthy,
                lagBytes: host.role == .primary ? 0 : host.lagBytes,
                lagSeconds: host.role == .primary ? 0 : host.lagSeconds,
                walReceiver: host.walReceiverStatus,
                unfit: host.role == .primary
                    ? nil : host.unfitReason(maximumLagBytes: database.maximumLagBytes, maximumLag: database.maximumLag)
            )
        }
    }
}
