import Foundation
import Hummingbird
import Logging
import PostgresNIO

/// The hand-written baseline for `scripts/bench-http.sh`: the example's items routes with the
/// same SQL, written directly on PostgresNIO (`PostgresClient.withTransaction`), no ContextDB.
///
/// Usage: BaselineServer PORT, with POSTGRES_* and POSTGRES_REPLICA_PORT in the environment.
@main
struct BaselineServer {
    struct NewItem: Decodable { let text: String }
    struct CreatedItem: ResponseEncodable { let id: Int }
    struct Item: ResponseEncodable {
        let id: Int
        let text: String
        let served_by: String
    }
    struct ReadBack: ResponseEncodable {
        let id: Int
        let found: Bool
        let served_by: String
    }

    static func main() async throws {
        let environment = ProcessInfo.processInfo.environment
        let port = CommandLine.arguments.dropFirst().first.flatMap(Int.init) ?? 8081
        let host = environment["POSTGRES_HOSTNAME"] ?? "127.0.0.1"
        let user = environment["POSTGRES_USER"] ?? "contextdb"
        let password = environment["POSTGRES_PASSWORD"] ?? "contextdb"
        let database = environment["POSTGRES_DB"] ?? "contextdb"
        let primaryPort = environment["POSTGRES_PORT"].flatMap(Int.init) ?? 25432
        let replicaPort = environment["POSTGRES_REPLICA_PORT"].flatMap(Int.init) ?? 25433
        let logger = Logger(label: "baseline")

        func client(_ port: Int) -> PostgresClient {
            var configuration = PostgresClient.Configuration(
                host: host, port: port, username: user, password: password, database: database, tls: .disable
            )
            configuration.options.maximumConnections = 20
            return PostgresClient(configuration: configuration, backgroundLogger: logger)
        }
        let primary = client(primaryPort)
        let replica = client(replicaPort)
        let replicaName = "\(host):\(replicaPort)"

        @Sendable func insert(_ text: String) async throws -> Int {
            try await primary.withTransaction(logger: logger) { connection in
                try await connection.query("INSERT INTO items (text) VALUES (\(text)) RETURNING id", logger: logger)
                    .collect().first!.decode(Int.self)
            }
        }
        @Sendable func read(_ id: Int) async throws -> String? {
            try await replica.withTransaction(logger: logger) { connection in
                try await connection.query("SELECT text FROM items WHERE id = \(id)", logger: logger)
                    .collect().first?.decode(String.self)
            }
        }

        let router = Router()
        router.post("/items") { request, context in
            let item = try await request.decode(as: NewItem.self, context: context)
            return EditedResponse(status: .created, response: CreatedItem(id: try await insert(item.text)))
        }
        router.get("/items/{id}") { _, context in
            let id = try context.parameters.require("id", as: Int.self)
            guard let text = try await read(id) else { throw HTTPError(.notFound) }
            return Item(id: id, text: text, served_by: replicaName)
        }
        router.post("/items/write_then_read") { request, context in
            let item = try await request.decode(as: NewItem.self, context: context)
            let id = try await insert(item.text)
            return ReadBack(id: id, found: try await read(id) != nil, served_by: replicaName)
        }
        var app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: port)), logger: logger)
        app.addServices(primary, replica)
        try await app.runService()
    }
}
