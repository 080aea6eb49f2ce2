import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ContextDBTesting
import Foundation
import PostgresNIO
import Testing
import TestSupport

/// The examples' HTTP-level suites — Hummingbird's and Vapor's, in one test process — share
/// the examples' tables, so they run one test at a time, nested in this suite.
@Suite(.serialized, .enabled(if: ExampleHarness.isAvailable))
public enum ExampleTests {}

/// What the Hummingbird and the Vapor example's tests share: the test cluster as the examples
/// see it, a connect of the tests' own for counting and resetting, and the HTTP contract both
/// examples answer.
public enum ExampleHarness {
    public static let applicationName = "contextdb-example-test"

    public static var isAvailable: Bool { TestCluster.isAvailable }
    public static var primaryEndpoint: String { TestCluster.primaryEndpoint }
    public static var replicaEndpoints: [String] { TestCluster.replicaEndpoints }

    /// `DATABASE_URL` as the example reads it: the primary first, then the replicas.
    public static var databaseURL: String {
        TestCluster.clusterURL(query: "sslmode=disable&application_name=\(applicationName)&connect_timeout=5")
    }

    /// A connect of the test's own, for counting and resetting.
    public static func withAdmin<R>(_ body: (DBConnect<PostgresEngine>) async throws -> R) async throws -> R {
        let admin = try DBConnect(label: "admin", url: databaseURL.replacingOccurrences(of: applicationName, with: "contextdb-admin"))
        return try await withRunningServices([admin]) { try await body(admin) }
    }

    /// Creates the example's tables when missing and empties them.
    public static func emptyTables() async throws {
        try await withAdmin { admin in
            try await admin.withTransaction { session in
                for statement in ExampleDatabase.schema { try await session.execute(PostgresQuery(unsafeSQL: statement)) }
                try await session.execute("TRUNCATE example, items RESTART IDENTITY")
            }
        }
    }

    public static func rows(in table: String) async throws -> Int {
        try await withAdmin { admin in
            try await admin.withSession { try await $0.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self) ?? -1 }
        }
    }

    /// Waits (up to 10 s) until none of the example's server connections is busy — a released
    /// connection's session reset runs briefly after the release.
    public static func expectNoBusyConnections(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try await eventually("none of the example's connections is busy", timeout: .seconds(10), sourceLocation: sourceLocation) {
            try await busyConnections().isEmpty
        }
    }

    /// The example's server connections that are not idle (in a transaction, or running).
    public static func busyConnections() async throws -> [String] {
        try await withAdmin { admin in
            try await admin.withSession { session in
                try await session.query(
                    "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = \(applicationName) AND state <> 'idle'"
                ).map { try $0.decode(String.self) }
            }
        }
    }

    /// How many connections the example's sessions hold, over every engine of both connects.
    public static func leased<Engine: ExampleEngine>(_ database: ExampleDatabaseOf<Engine>) -> Int {
        (Array(database.primary.engines.values) + Array(database.replica.engines.values)).map(\.leasedConnectionCount).reduce(0, +)
    }
}

/// A response body as a JSON object (empty when it is not one).
public func json(_ body: some Sequence<UInt8>) -> [String: Any] {
    guard let object = try? JSONSerialization.jsonObject(with: Data(body)) else { return [:] }
    return object as? [String: Any] ?? [:]
}

/// The nine routes, their status codes, the rows they leave and whether they set the cookie.
public let exampleRoutes: [(path: String, status: Int, rows: Int, cookie: Bool)] = [
    ("/simple_usage", 200, 1, true),
    ("/atomic_base_example", 200, 2, true),
    ("/atomic_and_previous_transaction", 500, 5, false),
    ("/early_commit", 200, 4, true),
    ("/concurrent_queries", 200, 5, true),
    ("/early_rollback", 200, 0, false),
    ("/auto_rollback_by_exception", 500, 0, false),
    ("/auto_rollback_by_status_code", 500, 0, false),
    ("/early_connection_close", 200, 2, true),
]

/// Requests both examples refuse, with the status and the start of the message of the
/// `{"error":{"message":…}}` body they answer with.
public let exampleRefusals: [(method: String, path: String, body: String?, status: Int, message: String)] = [
    ("POST", "/items", "{", 400, "The given data was not valid input: "),
    ("POST", "/items", "{}", 400, "Coding key `text` not found."),
    ("POST", "/items", #"{"text":1}"#, 400, "Type mismatch for `text` key, expected `String` type."),
    ("POST", "/items/write_then_read", "", 400, "The given data was not valid input: "),
    ("GET", "/items/abc", nil, 400, "Parameter 'abc' can not be converted to the expected type (Int)"),
    ("GET", "/items/99999", nil, 404, "no item 99999"),
]

/// The message of an example's error body, or `nil`.
public func errorMessage(_ body: some Sequence<UInt8>) -> String? {
    (json(body)["error"] as? [String: Any])?["message"] as? String
}
