// swift-tools-version: 6.1
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
    ],
    dependencies: [
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        .target(
            name: "ContextDB",
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ContextDBPostgres",
            dependencies: [
                "ContextDB",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBTests",
            dependencies: ["ContextDB"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBPostgresTests",
            dependencies: ["ContextDBPostgres"],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
