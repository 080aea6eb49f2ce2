import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ExampleTestSupport
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import Prometheus
import Testing
import TestSupport

@testable import ContextDBExample

extension ExampleHarness {
    /// Builds the example on `engine` (libpq's, say) on empty tables and runs `body` with its
    /// database and app.
    static func withExample<Engine: ExampleEngine, R>(
        on engine: Engine.Type,
        _ body: (ExampleDatabaseOf<Engine>, any ApplicationProtocol) async throws -> R
    ) async throws -> R {
        let database = try ExampleDatabaseOf<Engine>(url: databaseURL, logger: Logger(label: "test"))
        let app = try await buildApplication(database: database, port: 0)
        try await emptyTables()
        return try await body(database, app)
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
        try await emptyTables()
        return try await body(database, app)
    }
}

/// A response body as a JSON object (empty when it is not one).
func json(_ body: ByteBuffer?) -> [String: Any] {
    json(body?.readableBytesView ?? ByteBuffer().readableBytesView)
}

/// A JSON request body.
func jsonBody(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }
