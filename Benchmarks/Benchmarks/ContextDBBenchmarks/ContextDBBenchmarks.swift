import Benchmark
import ContextDB
import NullEngine
import ContextDBLibPQ
import ContextDBPostgres
import Foundation
import Logging
import PostgresNIO

/// The PostgreSQL server of `scripts/pg-cluster.sh env` (POSTGRES_* variables).
enum Server {
    static let environment = ProcessInfo.processInfo.environment
    static var isConfigured: Bool { environment["POSTGRES_PORT"] != nil }
    static var url: String {
        "postgresql://\(environment["POSTGRES_USER"] ?? "contextdb"):\(environment["POSTGRES_PASSWORD"] ?? "contextdb")"
            + "@\(environment["POSTGRES_HOSTNAME"] ?? "127.0.0.1"):\(environment["POSTGRES_PORT"] ?? "25432")"
            + "/\(environment["POSTGRES_DB"] ?? "contextdb")?sslmode=disable"
    }
    static var replicaPorts: [String] {
        (environment["POSTGRES_REPLICA_PORTS"] ?? environment["POSTGRES_REPLICA_PORT"] ?? "25433").split(separator: ",").map(String.init)
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal, .instructions],
        maxDuration: .seconds(3),
        maxIterations: 1_000_000
    )

    let null = DBConnect(label: "null", host: "null") { _ in NullEngine() }

    Benchmark("Session lookup in an active context", configuration: .init(scalingFactor: .kilo)) { benchmark in
        try await withDBContext {
            _ = try await null.session()
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                blackHole(try await null.session())
            }
            benchmark.stopMeasurement()
        }
    }

    // A thousand lifecycles per sample, so a sample is not dominated by starting the measurement.
    Benchmark(
        "Request lifecycle on a null engine (context, session, BEGIN, COMMIT, close)",
        configuration: .init(scalingFactor: .kilo)
    ) { benchmark in
        for _ in benchmark.scaledIterations {
            try await withDBContext {
                try await null.session().withConnection { blackHole($0) }
            }
        }
    }

    // Routing: a snapshot read plus the policy, on a topology that knows one primary and two
    // replicas (probed once from the local cluster when it runs, else left unprobed).
    Benchmark("Routing decision (replica hook, round robin)", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let hosts = (["127.0.0.1:\(Server.environment["POSTGRES_PORT"] ?? "25432")"] + Server.replicaPorts.map { "127.0.0.1:\($0)" })
        let url = "postgresql://contextdb:contextdb@\(hosts.joined(separator: ","))/contextdb?sslmode=disable"
        let topology = try PostgresTopology(url: url)
        if Server.isConfigured { await topology.refresh() }
        let hook = topology.replicaHook(fallbackToPrimary: true)
        let replica = try DBConnect(label: "replica", url: url, options: DBSessionOptions(readOnly: true))
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            _ = try? await hook(DBHostRequest(connect: replica, consistencyToken: nil))
        }
        benchmark.stopMeasurement()
    }

    guard Server.isConfigured else { return }

    // Against the real primary: ContextDB versus PostgresNIO by hand.
    let primary = try! DBConnect(label: "primary", url: Server.url, maximumConnections: 4)
    let primaryTask = Task { try await primary.run() }  // its pool runs for the whole benchmark process
    _ = primaryTask
    var configuration = try! PostgresURL(Server.url).configuration()
    configuration.options.maximumConnections = 4
    let client = PostgresClient(configuration: configuration, backgroundLogger: Logger(label: "baseline"))
    let clientTask = Task { await client.run() }
    _ = clientTask

    Benchmark("SELECT 1 through a context session", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        for _ in benchmark.scaledIterations {
            try await withDBContext {
                blackHole(try await primary.session().queryValue("SELECT 1", as: Int.self))
            }
        }
    }

    Benchmark("SELECT 1 through PostgresClient.withTransaction by hand", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        for _ in benchmark.scaledIterations {
            try await client.withTransaction(logger: Logger(label: "baseline")) { connection in
                blackHole(try await connection.query("SELECT 1", logger: Logger(label: "baseline")).collect().first?.decode(Int.self))
            }
        }
    }

    @Sendable func createTable() async throws {
        try await primary.withTransaction {
            try await $0.execute("CREATE TABLE IF NOT EXISTS bench_items (id bigserial PRIMARY KEY, text text NOT NULL)")
        }
    }

    Benchmark("One-row INSERT transaction through a context session", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        try await createTable()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try await withDBContext {
                try await primary.session().execute("INSERT INTO bench_items (text) VALUES (\("bench"))")
            }
        }
        benchmark.stopMeasurement()
    }

    Benchmark("One-row INSERT transaction through PostgresClient.withTransaction by hand", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        try await createTable()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try await client.withTransaction(logger: Logger(label: "baseline")) { connection in
                _ = try await connection.query("INSERT INTO bench_items (text) VALUES (\("bench"))", logger: Logger(label: "baseline")).collect()
            }
        }
        benchmark.stopMeasurement()
    }

    // The same two transactions on the libpq engine (ContextDBLibPQ).
    let libpq = try! DBConnect(label: "libpq", conninfo: Server.url, maximumConnections: 4)
    let libpqTask = Task { try await libpq.run() }
    _ = libpqTask

    Benchmark("SELECT 1 through a context session on libpq", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        for _ in benchmark.scaledIterations {
            try await withDBContext {
                blackHole(try await libpq.session().queryValue("SELECT 1", as: Int.self))
            }
        }
    }

    Benchmark("One-row INSERT transaction through a context session on libpq", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        try await createTable()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try await withDBContext {
                try await libpq.session().execute("INSERT INTO bench_items (text) VALUES (\("bench"))")
            }
        }
        benchmark.stopMeasurement()
    }
}
