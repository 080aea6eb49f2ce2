// swift-tools-version: 6.2
import PackageDescription

/// Settings shared by every target: Swift 6 mode plus the upcoming features the house style asks for.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "swift-context-db",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ContextDB", targets: ["ContextDB"]),
        .library(name: "ContextDBPostgres", targets: ["ContextDBPostgres"]),
        .library(name: "ContextDBLibPQ", targets: ["ContextDBLibPQ"]),
        .library(name: "ContextDBHummingbird", targets: ["ContextDBHummingbird"]),
        .library(name: "ContextDBVapor", targets: ["ContextDBVapor"]),
        .library(name: "ContextDBTesting", targets: ["ContextDBTesting"]),
        .executable(name: "ContextDBExample", targets: ["ContextDBExample"]),
        .executable(name: "ContextDBVaporExample", targets: ["ContextDBVaporExample"]),
    ],
    dependencies: [
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/vapor/vapor", from: "4.122.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        // `swift package generate-documentation` (see the README); a plugin, never linked.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "ContextDB",
            dependencies: [
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ContextDBPostgres",
            dependencies: [
                "ContextDB",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // PostgreSQL's own client library, found with pkg-config (libpq-dev; Homebrew's libpq).
        // Only ContextDBLibPQ links it: a user of ContextDBPostgres never needs libpq.
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
        ),
        .target(
            name: "ContextDBLibPQ",
            dependencies: [
                "ContextDB", "ContextDBPostgres", "CLibPQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ContextDBHummingbird",
            dependencies: [
                "ContextDB",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ContextDBVapor",
            dependencies: [
                "ContextDB",
                .product(name: "Vapor", package: "vapor"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ContextDBTesting",
            dependencies: [
                "ContextDB",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // What the Hummingbird and the Vapor example share: the database, the routes' logic and
        // their answers, free of either framework.
        .target(
            name: "ContextDBExampleSupport",
            dependencies: [
                "ContextDB",
                "ContextDBPostgres",
                "ContextDBLibPQ",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "ContextDBVaporExample",
            dependencies: [
                "ContextDB",
                "ContextDBPostgres",
                "ContextDBVapor",
                "ContextDBExampleSupport",
                .product(name: "Vapor", package: "vapor"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "ContextDBExample",
            dependencies: [
                "ContextDBLibPQ",
                "ContextDB",
                "ContextDBPostgres",
                "ContextDBHummingbird",
                "ContextDBExampleSupport",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TestSupport",
            dependencies: [
                "ContextDB",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Tests/TestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBTests",
            dependencies: [
                "ContextDB", "ContextDBTesting", "TestSupport",
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBPostgresTests",
            dependencies: [
                "ContextDBPostgres", "ContextDBTesting", "TestSupport",
                .product(name: "InMemoryLogging", package: "swift-log"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBLibPQTests",
            dependencies: ["ContextDBLibPQ", "ContextDBPostgres", "ContextDBTesting", "CLibPQ", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBHummingbirdTests",
            dependencies: [
                "ContextDBExample",
                "ContextDBExampleSupport",
                "ContextDBLibPQ",
                "ExampleTestSupport",
                "ContextDBHummingbird",
                "ContextDBPostgres",
                "ContextDBTesting",
                "TestSupport",
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ExampleTestSupport",
            dependencies: [
                "ContextDB", "ContextDBPostgres", "ContextDBExampleSupport", "ContextDBTesting", "TestSupport",
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            path: "Tests/ExampleTestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBVaporTests",
            dependencies: [
                "ContextDBVaporExample",
                "ContextDBVapor",
                "ContextDBExampleSupport",
                "ContextDBPostgres",
                "ContextDBTesting",
                "ExampleTestSupport",
                "TestSupport",
                .product(name: "VaporTesting", package: "vapor"),
                .product(name: "Vapor", package: "vapor"),
            ],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
