// swift-tools-version: 6.2
import PackageDescription

// The benchmark suite lives in its own package so that users of ContextDB never resolve
// package-benchmark. Run from this folder: `swift package benchmark` (see README.md).
let package = Package(
    name: "ContextDBBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "swift-context-db", path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        .executableTarget(
            name: "ContextDBBenchmarks",
            dependencies: [
                .product(name: "ContextDB", package: "swift-context-db"),
                .product(name: "ContextDBPostgres", package: "swift-context-db"),
                .product(name: "ContextDBLibPQ", package: "swift-context-db"),
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                "NullEngine",
            ],
            path: "Benchmarks/ContextDBBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "BaselineServer",
            dependencies: [
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            path: "Sources/BaselineServer"
        ),
        .executableTarget(
            name: "TwinServer",
            dependencies: [
                .product(name: "ContextDB", package: "swift-context-db"),
                .product(name: "ContextDBPostgres", package: "swift-context-db"),
                .product(name: "ContextDBHummingbird", package: "swift-context-db"),
                .product(name: "Hummingbird", package: "hummingbird"),
            ],
            path: "Sources/TwinServer"
        ),
        .executableTarget(
            name: "ProfileHarness",
            dependencies: [
                .product(name: "ContextDB", package: "swift-context-db"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                "NullEngine",
            ],
            path: "Sources/ProfileHarness"
        ),
        .target(
            name: "NullEngine",
            dependencies: [.product(name: "ContextDB", package: "swift-context-db")],
            path: "Sources/NullEngine"
        ),
    ],
    swiftLanguageModes: [.v6]
)
