import ContextDB
import ContextDBPostgres
import Hummingbird
import PostgresNIO

/// A small items API: writes on the primary, reads through the replica connect, and a
/// write-then-read in one request.
struct ItemRoutes: Sendable {
    let database: ExampleDatabase

    struct NewItem: Decodable {
        let text: String
    }

    struct CreatedItem: ResponseEncodable {
        let id: Int
    }

    struct Item: ResponseEncodable {
        let id: Int
        let text: String
        let servedBy: String

        enum CodingKeys: String, CodingKey {
            case id, text
            case servedBy = "served_by"
        }
    }

    struct ReadBack: ResponseEncodable {
        let id: Int
        let found: Bool
        let servedBy: String

        enum CodingKeys: String, CodingKey {
            case id, found
            case servedBy = "served_by"
        }
    }

    struct Health: ResponseEncodable {
        let status: String
    }

    func add(to router: Router<BasicRequestContext>) {
        router.post("/items") { request, context in
            let item = try await request.decode(as: NewItem.self, context: context)
            return EditedResponse(status: .created, response: CreatedItem(id: try await insert(item.text)))
        }
        router.get("/items/{id}") { _, context in
            let id = try context.parameters.require("id", as: Int.self)
            let (session, row) = try await read(id)
            guard let row else { throw HTTPError(.notFound, message: "no item \(id)") }
            return Item(id: id, text: try row.decode(String.self), servedBy: session.host)
        }
        router.post("/items/write_then_read") { request, context in
            let item = try await request.decode(as: NewItem.self, context: context)
            let id = try await insert(item.text)
            try await database.primary.commit()
            let (session, row) = try await read(id)
            return ReadBack(id: id, found: row != nil, servedBy: session.host)
        }
        router.get("/health") { _, _ in
            for connect in [database.primary, database.replica] {
                do {
                    _ = try await connect.withSession { try await $0.queryValue("SELECT 1", as: Int.self) }
                } catch {
                    throw HTTPError(.serviceUnavailable, message: "the \(connect.label) database cannot serve: \(error)")
                }
            }
            return Health(status: "ok")
        }
    }

    /// Inserts an item through the primary's context session; the middleware commits it.
    func insert(_ text: String) async throws -> Int {
        let id = try await database.primary.session().queryValue(
            "INSERT INTO items (text) VALUES (\(text)) RETURNING id", as: Int.self
        )
        guard let id else { throw HTTPError(.internalServerError, message: "INSERT returned no id") }
        return id
    }

    /// Reads an item's text through the replica's context session.
    func read(_ id: Int) async throws -> (DBSession<PostgresEngine>, PostgresRow?) {
        let session = try await database.replica.session()
        return (session, try await session.queryFirst("SELECT text FROM items WHERE id = \(id)"))
    }
}
