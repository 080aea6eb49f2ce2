import ContextDBExampleSupport
import Hummingbird

extension ItemStore.CreatedItem: ResponseEncodable {}
extension ItemStore.Item: ResponseEncodable {}
extension ItemStore.ReadBack: ResponseEncodable {}
extension ItemStore.Health: ResponseEncodable {}

/// The example's routes on Hummingbird's router: the nine scenarios of the Python original
/// (`ExampleScenarios`), the items API (`ItemStore`) and `GET /topology` (`TopologyReport`).
struct ExampleRoutes: Sendable {
    let scenarios: ExampleScenarios
    let items: ItemStore
    let report: TopologyReport

    init<Engine: ExampleEngine>(database: ExampleDatabaseOf<Engine>) {
        scenarios = ExampleScenarios(database: database)
        items = ItemStore(database: database)
        report = TopologyReport(database: database)
    }

    func add(to router: Router<BasicRequestContext>) {
        let items = self.items, report = self.report
        for (path, handler) in scenarios.routes {
            router.post(RouterPath(path)) { _, _ in Response(status: HTTPResponse.Status(code: try await handler())) }
        }
        router.post("/items") { request, context in
            let item = try await newItem(request, context)
            let id = try await failing { try await items.insert(item.text) }
            return EditedResponse(status: .created, response: ItemStore.CreatedItem(id: id))
        }
        router.get("/items/{id}") { _, context in
            let id = try context.parameters.require("id", as: Int.self)
            return try await failing { try await items.item(id) }
        }
        router.post("/items/write_then_read") { request, context in
            let item = try await newItem(request, context)
            return try await failing { try await items.writeThenRead(item.text) }
        }
        router.get("/health") { _, _ in try await failing { try await items.health() } }
        router.get("/health/live") { _, _ in try await failing { try report.live() } }
        router.get("/health/ready") { _, _ in try await failing { try report.ready() } }
        router.get("/topology") { request, context in
            try context.responseEncoder.encode(report.hosts, from: request, context: context)
        }
    }

    /// The request's `NewItem`, decoded as the Vapor example decodes it.
    private func newItem(_ request: Request, _ context: BasicRequestContext) async throws -> ItemStore.NewItem {
        let body = try await request.body.collect(upTo: context.maxUploadSize)
        return try await failing { try ItemStore.NewItem.decode(json: body.readableBytesView) }
    }

    /// `body`'s result, with an `ExampleFailure` turned into Hummingbird's `HTTPError`.
    private func failing<R>(_ body: () async throws -> R) async throws -> R {
        do {
            return try await body()
        } catch let failure as ExampleFailure {
            throw HTTPError(HTTPResponse.Status(code: failure.status), message: failure.message)
        }
    }
}
