import ArgumentParser
import ContextDB
import ContextDBExampleSupport
import ContextDBLibPQ
import ContextDBPostgres
import Foundation
import Hummingbird
import InMemoryTracing
import Logging
import Metrics
import Prometheus
import Tracing

/// The example server: every workflow of ContextDB behind HTTP routes.
@main
struct ExampleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ContextDBExample",
        abstract: "ContextDB's example app: the Python original's routes plus a primary/replica items API.",
        discussion: """
            DATABASE_URL (libpq URI) names every host of the cluster; which one is the primary \
            and which are replicas is found by probing them, also after a failover. Default: the \
            local cluster of scripts/pg-cluster.sh. REPLICA_MAX_LAG_BYTES (default 16 MiB) and \
            REPLICA_MAX_LAG_SECONDS (default 10) limit how far a replica may lag to serve a read \
            that carries no X-WAL-LSN token. Statements have a 5 s deadline. \
            READ_YOUR_WRITES=off turns read-your-own-writes off (on by default); \
            RESET_SESSION_STATE=off skips resetting released connections (to measure its cost). \
            GET /metrics serves every metric in Prometheus' text format; METRICS=off records none \
            (to measure their cost). TRACING=on traces every request, transaction and statement \
            in process and logs the spans. DATABASE_ENGINE=libpq runs it on libpq (ContextDBLibPQ) \
            instead of PostgresNIO.
            """
    )

    @Option(help: "The address to listen on.")
    var hostname = "127.0.0.1"

    @Option(help: "The port to listen on.")
    var port = 8080

    func run() async throws {
        var logger = Logger(label: "ContextDBExample")
        logger.logLevel = ProcessInfo.processInfo.environment["LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .info
        let environment = ProcessInfo.processInfo.environment
        // Metrics of the whole process (ContextDB's and Hummingbird's) go to one registry.
        var registry: PrometheusCollectorRegistry?
        if environment["METRICS"] != "off" {
            let metrics = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(MetricsRoutes.factory(on: metrics))
            registry = metrics
        }
        var tracer: InMemoryTracer?
        if environment["TRACING"] == "on" {
            let inMemory = InMemoryTracer()
            InstrumentationSystem.bootstrap(inMemory)
            tracer = inMemory
        }
        let instrumentation = DBInstrumentation(tracesStatements: tracer != nil)
        switch environment["DATABASE_ENGINE"] ?? "postgresnio" {
        case "postgresnio":
            try await serve(ExampleDatabase(environment: environment, instrumentation: instrumentation, logger: logger),
                            registry: registry, tracer: tracer, logger: logger)
        case "libpq":
            try await serve(ExampleDatabaseOf<LibPQEngine>(environment: environment, instrumentation: instrumentation, logger: logger),
                            registry: registry, tracer: tracer, logger: logger)
        case let other:
            throw ValidationError("DATABASE_ENGINE=\(other) is not postgresnio or libpq")
        }
    }

    private func serve<Engine: ExampleEngine>(
        _ database: ExampleDatabaseOf<Engine>, registry: PrometheusCollectorRegistry?, tracer: InMemoryTracer?, logger: Logger
    ) async throws {
        var app = try await buildApplication(
            database: database, hostname: hostname, port: port, metrics: registry, tracing: tracer != nil, logger: logger
        )
        if let tracer { app.addServices(SpanLogger(tracer: tracer, logger: logger)) }
        try await app.runService()
    }
}
