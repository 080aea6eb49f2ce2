import ContextDBExampleSupport
import ContextDBPostgres
import Foundation
import Logging
import Vapor

/// The example server on Vapor: the same HTTP contract as `ContextDBExample` (Hummingbird),
/// route for route, with the same environment variables and the same `--hostname`/`--port`
/// options.
///
/// `DATABASE_URL` (libpq URI) names every host of the cluster (default: the local cluster of
/// `scripts/pg-cluster.sh`); `REPLICA_MAX_LAG_BYTES` (default 16 MiB) and
/// `REPLICA_MAX_LAG_SECONDS` (default 10) limit how far a replica may lag to serve a read
/// without an `X-WAL-LSN` token; `READ_YOUR_WRITES=off` turns read-your-own-writes off;
/// `RESET_SESSION_STATE=off` skips resetting released connections; `LOG_LEVEL` sets the level.
@main
enum VaporExample {
    static func main() async throws {
        let options = try ServerOptions(arguments: Array(CommandLine.arguments.dropFirst()))
        // Vapor reads LOG_LEVEL; its own command line gets no arguments, so `serve` runs with
        // the address set below.
        var environment = try Environment.detect(arguments: [CommandLine.arguments[0]])
        try LoggingSystem.bootstrap(from: &environment)
        let app = try await Application.make(environment)
        do {
            let database = try ExampleDatabase(environment: ProcessInfo.processInfo.environment, logger: app.logger)
            try configure(app, database: database, hostname: options.hostname, port: options.port)
            try await app.execute()
        } catch {
            app.logger.report(error: error)
            try? await app.asyncShutdown()
            throw error
        }
        try await app.asyncShutdown()
    }
}

/// `--hostname` (default `127.0.0.1`) and `--port` (default 8080), as `ContextDBExample` takes them.
struct ServerOptions {
    var hostname = "127.0.0.1"
    var port = 8080

    struct Invalid: Error, CustomStringConvertible {
        let description: String
    }

    init(arguments: [String]) throws {
        var rest = arguments[...]
        while let option = rest.popFirst() {
            let (name, inline) = option.split(separator: "=", maxSplits: 1).map(String.init).splitPair
            guard let value = inline ?? rest.popFirst() else { throw Invalid(description: "\(name) needs a value") }
            switch name {
            case "--hostname": hostname = value
            case "--port":
                guard let port = Int(value), (0...65535).contains(port) else {
                    throw Invalid(description: "--port \(value) is not a port number")
                }
                self.port = port
            default: throw Invalid(description: "unknown option \(name); use --hostname and --port")
            }
        }
    }
}

extension Array where Element == String {
    /// `[name]` or `[name, value]` as a pair.
    fileprivate var splitPair: (String, String?) { (self[0], count > 1 ? self[1] : nil) }
}
