import ContextDBPostgres
import Hummingbird

/// `GET /topology`: what the routing sees — every host, its role, health, lag in bytes and
/// seconds, its WAL receiver's status, and why a replica may not serve token-less reads.
struct TopologyRoutes: Sendable {
    let topology: PostgresTopology
    let maximumLagBytes: UInt64?
    let maximumLag: Duration?

    struct Host: Codable, Sendable {
        let host: String
        let role: String
        let healthy: Bool
        let lagBytes: UInt64?
        let lagSeconds: Double?
        let walReceiver: String?
        /// Why a replica may not serve token-less reads now; absent when it may.
        let unfit: String?

        enum CodingKeys: String, CodingKey {
            case host, role, healthy, unfit
            case lagBytes = "lag_bytes"
            case lagSeconds = "lag_seconds"
            case walReceiver = "wal_receiver"
        }
    }

    func add(to router: Router<BasicRequestContext>) {
        router.get("/topology") { request, context in
            let hosts = topology.snapshot.hosts.map { host in
                Host(
                    host: host.endpoint.description, role: host.role.rawValue, healthy: host.isHealthy,
                    lagBytes: host.role == .primary ? 0 : host.lagBytes,
                    lagSeconds: host.role == .primary ? 0 : host.lagSeconds,
                    walReceiver: host.walReceiverStatus,
                    unfit: host.role == .primary ? nil : host.unfitReason(maximumLagBytes: maximumLagBytes, maximumLag: maximumLag)
                )
            }
            return try context.responseEncoder.encode(hosts, from: request, context: context)
        }
    }
}
