import ContextDB
import ContextDBPostgres
import ContextDBTesting
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import PostgresNIO
import Prometheus
import Testing
import TestSupport

@testable import ContextDBExample

/// The example's HTTP-level suites share its tables, so they run one test at a time.
@Suite(.serialized, .enabled(if: ExampleHarness.isAvailable))
enum ExampleTests {}

/// Builds the example app on the test cluster, with empty tables, and counts what it left.
enum ExampleHarness {
    static let applicationName = "contextdb-example-test"

    static var isAvailable: Bool { TestCluster.isAvailable }
    static var primaryEndpoint: String { TestCluster.primaryEndpoint }
    static var replicaEndpoints: [String] { TestCluster.replicaEndpoints }

    /// `DATABASE_URL` as the example reads it: the primary first, then the replicas.
    static var databaseURL: String {
        TestCluster.clusterURL(query: "sslmode=disable&application_name=\(applicationName)&connect_timeout=5")
    }

    /// A connect of the test's own, for counting and resetting.
    static func withAdmin<R>(_ body: (DBConnect<PostgresEngine>) async throws -> R) async throws -> R {
        let admin = try DBConnect(label: "admin", url: databaseURL.replacingOccurrences(of: applicationName, with: "contextdb-admin"))
        return try await withRunningServices([admin]) { try await body(admin) }
    }

    /// Builds the example on empty tables and runs `body` with its database and app.
    static func withExample<R>(
        url: String = databaseURL,
        maximumConnections: Int = 20,
        metrics: PrometheusCollectorRegistry? = nil,
        extraRoutes: @escaping (Router<BasicRequestContext>, ExampleDatabase) -> Void = { _, _ in },
        _ body: (ExampleDatabase, any ApplicationProtocol) async throws -> R
    ) async throws -> R {
        let database = try ExampleDatabase(
            url: url, maximumConnections: maximumConnections,
            instrumentation: DBInstrumentation(metricsFactory: metrics.map { MetricsRoutes.factory(on: $0) }),
            logger: Logger(label: "test")
        )
        let app = try await buildApplication(database: database, port: 0, metrics: metrics) { router in
            extraRoutes(router, database)
        }
        try await withAdmin { admin in
            try await admin.withTransaction { session in
                for statement in ExampleDatabase.schema { try await session.execute(PostgresQuery(unsafeSQL: statement)) }
                try await session.execute("TRUNCATE example, items RESTART IDENTITY")
            }
        }
        return try await body(database, app)
    }

    static func rows(in table: String) async throws -> Int {
        try await withAdmin { admin in
            try await admin.withSession { try await $0.queryValue("SELECT count(*)::int FROM \(unescaped: table)", as: Int.self) ?? -1 }
        }
    }

    /// Waits (up to 10 s) until none of the example's server connections is busy — a released
    /// connection's session reset runs briefly after the release.
    static func expectNoBusyConnections(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try await eventually("none of the example's connections is busy", timeout: .seconds(10), sourceLocation: sourceLocation) {
            try await busyConnections().isEmpty
        }
    }

    /// The example's server connections that are not idle (in a transaction, or running).
    static func busyConnections() async throws -> [String] {
        try await withAdmin { admin in
            try await admin.withSession { session in
                try await session.query(
                    "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = \(applicationName) AND state <> 'idle'"
                ).map { try $0.decode(String.self) }
            }
        }
    }

    /// How many connections the example's sessions hold, over every engine of both connects.
    static func leased(_ database: ExampleDatabase) -> Int {
        (Array(database.primary.engines.values) + Array(database.replica.engines.values)).map(\.leasedConnectionCount).reduce(0, +)
    }
}

/// A response body as a JSON object (empty when it is not one).
func json(_ body: ByteBuffer?) -> [String: Any] {
    guard let body, let object = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) else { return [:] }
    return object as? [String: Any] ?? [:]
}

/// A JSON request body.
func jsonBody(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

/// The nine routes, their statuses, the rows they leave and whether they set the cookie.
let exampleRoutes: [(path: String, status: HTTPResponse.Status, rows: Int, cookie: Bool)] = [
    ("/simple_usage", .ok, 1, true),
    ("/atomic_base_example", .ok, 2, true),
    ("/atomic_and_previous_transaction", .internalServerError, 5, false),
    ("/early_commit", .ok, 4, true),
    ("/concurrent_queries", .ok, 5, true),
    ("/early_rollback", .ok, 0, false),
    ("/auto_rollback_by_exception", .internalServerError, 0, false),
    ("/auto_rollback_by_status_code", .internalServerError, 0, false),
    ("/early_connection_close", .ok, 2, true),
]
