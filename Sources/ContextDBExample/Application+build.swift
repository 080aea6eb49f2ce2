import ContextDB
import ContextDBHummingbird
import Hummingbird
import Logging

/// Builds the example application on `database`, creating its tables first.
func buildApplication(
    database: ExampleDatabase,
    hostname: String = "127.0.0.1",
    port: Int = 8080,
    logger: Logger = Logger(label: "ContextDBExample")
) async throws -> some ApplicationProtocol {
    try await database.createTables()
    var app = Application(
        router: buildRouter(database: database),
        configuration: .init(address: .hostname(hostname, port: port), serverName: "ContextDBExample"),
        logger: logger
    )
    app.addServices(DatabaseService(database: database))
    return app
}

/// The router with the session middleware and every route.
func buildRouter(database: ExampleDatabase) -> Router<BasicRequestContext> {
    let router = Router()
    router.add(
        middleware: DBSessionMiddleware(
            beforeCommit: ExampleDatabase.captureWALPosition,
            onCommitted: { context, response in
                if let lsn = context[CommittedWALPosition.self] {
                    response.headers[.setCookie] = "X-WAL-LSN=\(lsn); Path=/; SameSite=Lax"
                }
            }
        )
    )
    ExampleRoutes(database: database).add(to: router)
    ItemRoutes(database: database).add(to: router)
    return router
}
