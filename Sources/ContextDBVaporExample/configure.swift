import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ContextDBVapor
import Foundation
import Vapor

/// Sets `app` up as the example: the address, the error answers, the session middleware (which
/// also carries the `X-WAL-LSN` token), the topology and both connects as services, the tables
/// created at boot, and every route.
/// - Parameters:
///   - app: A Vapor application that has not booted.
///   - database: The example's database.
///   - hostname: The address to listen on.
///   - port: The port to listen on; 0 for any free port.
func configure(_ app: Application, database: ExampleDatabase, hostname: String = "127.0.0.1", port: Int = 8080) throws {
    app.http.server.configuration.hostname = hostname
    app.http.server.configuration.port = port
    app.http.server.configuration.serverName = "ContextDBVaporExample"
    // Errors answer as the Hummingbird example's do, so one HTTP test suite checks both.
    app.middleware = Middlewares()
    app.middleware.use(ExampleErrorMiddleware())
    app.middleware.use(DBSessionMiddleware())
    app.contextDB.use(database.topology, database.primary, database.replica)
    app.lifecycle.use(CreateTables(database: database))
    addRoutes(to: app, database: database)
}

/// Probes the cluster and creates the tables once the connects run (they start at boot).
struct CreateTables: LifecycleHandler {
    let database: ExampleDatabase

    func didBootAsync(_ application: Application) async throws {
        try await database.start()
    }
}

/// The nine scenarios of the Python original, the items API and `GET /topology`.
func addRoutes(to app: Application, database: ExampleDatabase) {
    for (path, handler) in ExampleScenarios(database: database).routes {
        app.on(.POST, path.pathComponents) { _ async throws -> Response in
            Response(status: HTTPResponseStatus(statusCode: try await handler()))
        }
    }
    let items = ItemStore(database: database)
    app.post("items") { request async throws -> Response in
        let item = try ItemStore.NewItem.decode(json: request.body.data?.readableBytesView ?? ByteBuffer().readableBytesView)
        return try json(ItemStore.CreatedItem(id: try await items.insert(item.text)), status: .created)
    }
    app.get("items", ":id") { request async throws -> Response in
        guard let id = request.parameters.get("id", as: Int.self) else {
            throw ExampleFailure(status: 400, message: "Parameter '\(request.parameters.get("id") ?? "")' can not be converted to the expected type (Int)")
        }
        return try json(try await items.item(id))
    }
    app.post("items", "write_then_read") { request async throws -> Response in
        let item = try ItemStore.NewItem.decode(json: request.body.data?.readableBytesView ?? ByteBuffer().readableBytesView)
        return try json(try await items.writeThenRead(item.text))
    }
    app.get("health") { _ async throws -> Response in try json(try await items.health()) }
    let report = TopologyReport(database: database)
    app.get("health", "live") { _ async throws -> Response in try json(try report.live()) }
    app.get("health", "ready") { _ async throws -> Response in try json(try report.ready()) }
    app.get("topology") { _ async throws -> Response in try json(report.hosts) }
}

/// A JSON response, encoded as the Hummingbird example encodes it.
func json(_ value: some Encodable, status: HTTPResponseStatus = .ok) throws -> Response {
    var headers = HTTPHeaders()
    headers.contentType = .json
    return Response(status: status, headers: headers, body: .init(data: try JSONEncoder().encode(value)))
}

/// Answers errors as Hummingbird does: an `ExampleFailure` or Vapor's `Abort` with its status
/// and `{"error":{"message":…}}`, any other error with a bare 500.
struct ExampleErrorMiddleware: AsyncMiddleware {
    struct Body: Encodable {
        struct Message: Encodable {
            let message: String
        }
        let error: Message
    }

    func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        do {
            return try await next.respond(to: request)
        } catch let failure as ExampleFailure {
            return try json(Body(error: .init(message: failure.message)), status: HTTPResponseStatus(statusCode: failure.status))
        } catch let abort as any AbortError {
            let response = try json(Body(error: .init(message: abort.reason)), status: abort.status)
            response.headers.add(contentsOf: abort.headers)
            return response
        } catch {
            request.logger.debug("unrecognised error", metadata: ["error.type": "\(String(reflecting: type(of: error)))"])
            return Response(status: .internalServerError)
        }
    }
}
