import ContextDB
import ContextDBHummingbird
import Hummingbird
import Logging

/// Builds the example application on `database`: probes the cluster, creates the tables, and
/// runs the topology service beside the server.
/// - Parameter configure: Adds routes of the caller's (tests) to the router.
func buildApplication(
    database: ExampleDatabase,
    hostname: String = "127.0.0.1",
    port: Int = 8080,
    logger: Logger = Logger(label: "ContextDBExample"),
    configure: (Router<BasicRequestContext>) -> Void = { _ in }
) async throws -> some ApplicationProtocol {
    try await database.start()
    let router = buildRouter(database: database)
    configure(router)
    var app = Application(
        router: router,
        configuration: .init(address: .hostname(hostname, port: port), serverName: "ContextDBExample"),
        logger: logger
    )
    app.addServices(database.topology, DatabaseService(database: database))
    return app
}

/// The router with the session middleware (which also carries the `X-WAL-LSN` token) and
/// every route.
func buildRouter(database: ExampleDatabase) -> Router<BasicRequestContext> {
    let router = Router()
    router.add(middleware: DBSessionMiddleware())
    ExampleRoutes(database: database).add(to: router)
    ItemRoutes(database: database).add(to: router)
    TopologyRoutes(
        topology: database.topology, maximumLagBytes: database.maximumLagBytes, maximumLag: database.maximumLag
    ).add(to: router)
    return router
}
