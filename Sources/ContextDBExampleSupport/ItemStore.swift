import ContextDB
import Foundation

/// The items API's logic, free of any web framework: writes on the primary, reads through the
/// replica connect, and a write-then-read in one request. The examples map its answers and its
/// ``ExampleFailure``s to their own responses.
public struct ItemStore: Sendable {
    private let insertItem: @Sendable (String) async throws -> Int?
    private let readItem: @Sendable (Int) async throws -> (host: String, text: String?)
    private let commitPrimary: @Sendable () async throws -> Void
    private let probes: [(label: String, selectOne: @Sendable () async throws -> Void)]

    /// The store of `database`, on either engine.
    public init<Engine: ExampleEngine>(database: ExampleDatabaseOf<Engine>) {
        insertItem = { text in try await Engine.insertItem(text, in: database.primary.session()) }
        readItem = { id in
            let session = try await database.replica.session()
            return (session.host, try await Engine.itemText(id, in: session))
        }
        commitPrimary = { try await database.primary.commit() }
        probes = [database.primary, database.replica].map { connect in
            (connect.label, { try await connect.withSession { try await Engine.selectOne(in: $0) } })
        }
    }

    /// `POST /items`'s body.
    public struct NewItem: Codable, Sendable {
        public let text: String

        /// Decodes a request body, failing as both examples answer a bad one: a 400 whose
        /// message says what is wrong (Hummingbird's wording, so the examples agree).
        /// - Throws: ``ExampleFailure`` with status 400.
        public static func decode(json body: some Sequence<UInt8>) throws -> NewItem {
            func path(_ keys: [any CodingKey]) -> String { keys.map(\.stringValue).joined(separator: ".") }
            do {
                return try JSONDecoder().decode(NewItem.self, from: Data(body))
            } catch DecodingError.dataCorrupted(let context) {
                throw ExampleFailure(status: 400, message: "The given data was not valid input: \(context.debugDescription)")
            } catch DecodingError.keyNotFound(let key, _) {
                throw ExampleFailure(status: 400, message: "Coding key `\(key.stringValue)` not found.")
            } catch DecodingError.valueNotFound(_, let context) {
                throw ExampleFailure(status: 400, message: "Value not found for `\(path(context.codingPath))` key.")
            } catch DecodingError.typeMismatch(let type, let context) {
                throw ExampleFailure(status: 400, message: "Type mismatch for `\(path(context.codingPath))` key, expected `\(type)` type.")
            }
        }
    }

    /// `POST /items`'s answer (201).
    public struct CreatedItem: Codable, Sendable {
        public let id: Int

        /// The answer for the item `id`.
        public init(id: Int) {
            self.id = id
        }
    }

    /// `GET /items/{id}`'s answer.
    public struct Item: Codable, Sendable {
        public let id: Int
        public let text: String
        /// The host that served the read (`host:port`).
        public let servedBy: String

        enum CodingKeys: String, CodingKey {
            case id, text
            case servedBy = "served_by"
        }
    }

    /// `POST /items/write_then_read`'s answer.
    public struct ReadBack: Codable, Sendable {
        public let id: Int
        public let found: Bool
        public let servedBy: String

        enum CodingKeys: String, CodingKey {
            case id, found
            case servedBy = "served_by"
        }
    }

    /// `GET /health`'s answer.
    public struct Health: Codable, Sendable {
        public let status: String

        /// The answer `status`.
        public init(status: String) {
            self.status = status
        }
    }

    /// Inserts an item through the primary's context session; the middleware commits it.
    /// - Returns: The new item's id.
    public func insert(_ text: String) async throws -> Int {
        guard let id = try await insertItem(text) else { throw ExampleFailure(status: 500, message: "INSERT returned no id") }
        return id
    }

    /// Reads an item through the replica's context session.
    /// - Throws: ``ExampleFailure`` 404 when there is no such item.
    public func item(_ id: Int) async throws -> Item {
        let (host, text) = try await readItem(id)
        guard let text else { throw ExampleFailure(status: 404, message: "no item \(id)") }
        return Item(id: id, text: text, servedBy: host)
    }

    /// Inserts an item, commits, and reads it back through the replica connect in the same
    /// request (read-your-own-writes makes the read wait for a replica that has it).
    public func writeThenRead(_ text: String) async throws -> ReadBack {
        let id = try await insert(text)
        try await commitPrimary()
        let (host, found) = try await readItem(id)
        return ReadBack(id: id, found: found != nil, servedBy: host)
    }

    /// Runs `SELECT 1` on both connects, outside the request's context.
    /// - Throws: ``ExampleFailure`` 503 naming the connect that cannot serve.
    public func health() async throws -> Health {
        for (label, selectOne) in probes {
            do {
                try await selectOne()
            } catch {
                throw ExampleFailure(status: 503, message: "the \(label) database cannot serve: \(error)")
            }
        }
        return Health(status: "ok")
    }
}

/// A route's answer other than success: an HTTP status and a message for the client.
public struct ExampleFailure: Error, Sendable {
    /// The HTTP status code (404, 500, 503).
    public let status: Int
    /// What went wrong, for the response body.
    public let message: String

    /// A failure with `status` and `message`.
    public init(status: Int, message: String) {
        self.status = status
        self.message = message
    }
}
