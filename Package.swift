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
    ],
    targets: [
        .target(
            name: "ContextDB",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ContextDBTests",
            dependencies: ["ContextDB"],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
