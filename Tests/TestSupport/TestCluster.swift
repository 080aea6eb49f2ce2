import Foundation

/// The test cluster, from the `POSTGRES_*` variables `scripts/test.sh` exports
/// (`scripts/pg-cluster.sh env` prints them): one place for every test target.
public enum TestCluster {
    public static let environment = ProcessInfo.processInfo.environment

    public static var host: String { environment["POSTGRES_HOSTNAME"] ?? "127.0.0.1" }
    public static var port: Int { environment["POSTGRES_PORT"].flatMap(Int.init) ?? 5432 }
    public static var user: String { environment["POSTGRES_USER"] ?? "contextdb" }
    public static var password: String { environment["POSTGRES_PASSWORD"] ?? "contextdb" }
    public static var database: String { environment["POSTGRES_DB"] ?? "contextdb" }
    public static var replicaHost: String { environment["POSTGRES_REPLICA_HOSTNAME"] ?? host }
    public static var replicaPort: Int { environment["POSTGRES_REPLICA_PORT"].flatMap(Int.init) ?? port + 1 }
    /// Every replica's port (`POSTGRES_REPLICA_PORTS`, comma-separated), else ``replicaPort``.
    public static var replicaPorts: [Int] {
        environment["POSTGRES_REPLICA_PORTS"].map { $0.split(separator: ",").compactMap { Int($0) } } ?? [replicaPort]
    }

    /// The primary as `"host:port"`.
    public static var primaryEndpoint: String { "\(host):\(port)" }
    /// Every replica as `"host:port"`.
    public static var replicaEndpoints: [String] { replicaPorts.map { "\(replicaHost):\($0)" } }

    /// Run the integration tests when a cluster is configured, and always in CI, where an
    /// unreachable database must fail the run rather than skip it.
    public static var isAvailable: Bool { environment["POSTGRES_PORT"] != nil || environment["CI"] == "true" }

    /// A URI for one host (the primary unless told otherwise).
    public static func url(host: String? = nil, port: Int? = nil, user: String? = nil, password: String? = nil,
                           database: String? = nil, query: String = "sslmode=disable") -> String {
        let credentials = "\(user ?? self.user):\(password ?? self.password)"
        return "postgresql://\(credentials)@\(host ?? self.host):\(port ?? self.port)/\(database ?? self.database)?\(query)"
    }

    /// A URI naming every host: the primary first, then the replicas.
    public static func clusterURL(query: String = "sslmode=disable") -> String {
        let hosts = ([primaryEndpoint] + replicaEndpoints).joined(separator: ",")
        return "postgresql://\(user):\(password)@\(hosts)/\(database)?\(query)"
    }

    public static var primaryURL: String { url() }
    public static var replicaURL: String { url(host: replicaHost, port: replicaPort) }
}
