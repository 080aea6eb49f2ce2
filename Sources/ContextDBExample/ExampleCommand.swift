import ArgumentParser
import Foundation
import Hummingbird
import Logging

/// The example server: every workflow of ContextDB behind HTTP routes.
@main
struct ExampleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ContextDBExample",
        abstract: "ContextDB's example app: the Python original's routes plus a primary/replica items API.",
        discussion: """
            DATABASE_URL (libpq URI, several hosts allowed) names the database: the first host \
            is the primary, the others are replicas. Default: the local cluster of \
            scripts/pg-cluster.sh.
            """
    )

    @Option(help: "The address to listen on.")
    var hostname = "127.0.0.1"

    @Option(help: "The port to listen on.")
    var port = 8080

    func run() async throws {
        var logger = Logger(label: "ContextDBExample")
        logger.logLevel = ProcessInfo.processInfo.environment["LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .info
        let url = ProcessInfo.processInfo.environment["DATABASE_URL"] ?? ExampleDatabase.localClusterURL
        let database = try ExampleDatabase(url: url, logger: logger)
        let app = try await buildApplication(database: database, hostname: hostname, port: port, logger: logger)
        try await app.runService()
    }
}
