import ContextDBPostgres
import Hummingbird

/// `GET /topology`: what the routing sees — every host, its role, health and lag.
struct TopologyRoutes: Sendable {
    let topology: PostgresTopology

    struct Host: Codable, Sendable {
        let host: String
        let role: String
        let healthy: Bool
        let lagBytes: UInt64?

        enum CodingKeys: String, CodingKey {
            case host, role, healthy
            case lagBytes = "lag_bytes"
        }
    }

    func add(to router: Router<BasicRequestContext>) {
        router.get("/topology") { request, context in
            let hosts = topology.snapshot.hosts.map {
                Host(host: $0.endpoint.description, role: $0.role.rawValue, healthy: $0.isHealthy, lagBytes: $0.role == .primary ? 0 : $0.lagBytes)
            }
            return try context.responseEncoder.encode(hosts, from: request, context: context)
        }
    }
}
