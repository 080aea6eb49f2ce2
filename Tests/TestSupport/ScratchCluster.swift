import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A cluster of a test's own, started with `scripts/pg-cluster.sh` on ports no other test
/// uses, for tests that stop, promote or pause servers.
public struct ScratchCluster: Sendable {
    public let primaryPort: Int
    public let replicas: Int
    /// Started with `PG_SSL=on`: TLS with the certificates in ``tlsDirectory``.
    public var tls = false

    public init(primaryPort: Int, replicas: Int, tls: Bool = false) {
        self.primaryPort = primaryPort
        self.replicas = replicas
        self.tls = tls
    }

    public var replicaPorts: [Int] { (0..<replicas).map { primaryPort + 1 + $0 } }
    /// Where `PG_SSL=on` put the CA (`ca.crt`), another CA (`other-ca.crt`) and a client
    /// certificate for the role `contextdb_cert` (`client.crt`, `client.key`).
    public var tlsDirectory: String { directory + "/tls" }
    /// The cluster's folder (`pg-cluster.sh`'s default): `primary/server.log` is the primary's log.
    public var directory: String {
        let temporary = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        return temporary + "/contextdb-pg-\(primaryPort)"
    }
    public var url: String {
        let hosts = ([primaryPort] + replicaPorts).map { "127.0.0.1:\($0)" }.joined(separator: ",")
        return "postgresql://\(TestCluster.user):\(TestCluster.password)@\(hosts)/\(TestCluster.database)?sslmode=disable&connect_timeout=2"
    }
    public func endpoint(_ port: Int) -> String { "127.0.0.1:\(port)" }

    /// Starts a cluster, runs `body`, and removes the cluster whatever happens.
    public static func with<R>(
        primaryPort: Int, replicas: Int = 1, tls: Bool = false, _ body: (ScratchCluster) async throws -> R
    ) async throws -> R {
        let cluster = ScratchCluster(primaryPort: primaryPort, replicas: replicas, tls: tls)
        try await cluster.run("start")
        do {
            let result = try await body(cluster)
            _ = try? await cluster.run("stop")
            return result
        } catch {
            _ = try? await cluster.run("stop")
            throw error
        }
    }

    /// Runs `scripts/pg-cluster.sh` with this cluster's settings.
    ///
    /// Spawned with `posix_spawn` and reaped with `waitpid` on a dispatch thread: Foundation's
    /// `Process` never saw the script exit inside the test process (it stayed a zombie).
    @discardableResult
    public func run(_ arguments: String...) async throws -> String {
        let script = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/pg-cluster.sh").path
        var environment = ProcessInfo.processInfo.environment
        environment["PG_PRIMARY_PORT"] = "\(primaryPort)"
        environment["PG_REPLICA_PORT"] = "\(primaryPort + 1)"
        environment["PG_REPLICAS"] = "\(replicas)"
        environment["PG_CLUSTER_DIR"] = nil
        environment["PG_SSL"] = tls ? "on" : "off"
        let logPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("pg-cluster-\(primaryPort)-\(UInt32.random(in: 0...UInt32.max)).log").path
        defer { try? FileManager.default.removeItem(atPath: logPath) }

        let argv = (["/bin/bash", script] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        var pid = pid_t()
        let spawned = posix_spawn(&pid, "/bin/bash", &actions, nil, argv, envp)
        guard spawned == 0 else { throw ScriptFailed(arguments: arguments, output: "posix_spawn failed: \(spawned)") }
        let child = pid
        let status: Int32 = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                var status: Int32 = 0
                while waitpid(child, &status, 0) == -1 && errno == EINTR {}
                continuation.resume(returning: status)
            }
        }
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        guard status == 0 else { throw ScriptFailed(arguments: arguments, output: text) }
        return text
    }

    public struct ScriptFailed: Error, CustomStringConvertible {
        public let arguments: [String]
        public let output: String
        public var description: String { "pg-cluster.sh \(arguments.joined(separator: " ")) failed: \(output)" }
    }
}
