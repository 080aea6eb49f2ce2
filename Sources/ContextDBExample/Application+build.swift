import ContextDB
import ContextDBExampleSupport
import ContextDBHummingbird
import Hummingbird
import Logging
import Prometheus

/// Builds the example application on `database`: runs the topology and the two connects as
/// services beside the server, and before the server starts probes the cluster and creates the
/// tables.
/// - Parameter configure: Adds routes of the caller's (tests) to the router.
/// - Parameters:
///   - metrics: The registry `GET /metrics` serves; `nil` for no such route.
///   - tracing: Give every request a span (Hummingbird's `TracingMiddleware`), the parent of
///     its transactions' spans.
func buildApplication<Engine: ExampleEngine>(
    database: ExampleDatabaseOf<Engine>,
    hostname: String = "127.0.0.1",
    port: Int = 8080,
    metrics: PrometheusCollectorRegistry? = nil,
    tracing: Bool = false,
    logger: Logger = Logger(label: "ContextDBExample"),
    configure: (Router<BasicRequestContext>) -> Void = { _ in }
) async throws -> Application<RouterResponder<BasicRequestContext>> {
    let router = buildRouter(database: database, tracing: tracing)
    if let metrics { MetricsRoutes(registry: metrics).add(to: router) }
    configure(router)
    var app = Application(
        router: router,
        configuration: .init(address: .hostname(hostname, port: port), serverName: "ContextDBExample"),
        logger: logger
    )
    // The server is added after these, so a graceful shutdown stops it first, then closes the
    // connects' engines.
    app.addServices(database.topology, database.primary, database.replica)
    app.beforeServerStarts { try await database.start() }
    return app
}

/// The router with the session middleware (which also carries the `X-WAL-LSN` token) and
/// every route.
func buildRouter<Engine: ExampleEngine>(database: ExampleDatabaseOf<Engine>, tracing: Bool = false) -> Router<BasicRequestContext> {
    let router = Router()
    if tracing { router.add(middleware: TracingMiddleware()) }  // outside the session middleware: its span is the parent
    router.add(middleware: DBSessionMiddleware())
    ExampleRoutes(database: database).add(to: router)
    return router
}
