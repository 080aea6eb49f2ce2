import ContextDB
import ContextDBPostgres
import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Testing
import TestSupport

/// Runs `body` with a topology of `url`, probed every 100 ms in the background (5 s probe timeout).
func withTopology<R>(
    url: String,
    instrumentation: DBInstrumentation = DBInstrumentation(),
    logger: Logger = Logger(label: "ContextDB.Topology"),
    _ body: (PostgresTopology) async throws -> R
) async throws -> R {
    var configuration = PostgresTopology.Configuration()
    configuration.probeInterval = .milliseconds(100)
    // Generous: at the start of a test run dozens of tests log in at once (scram-sha-256 in a
    // debug build), and a probe that times out marks its host down at once.
    configuration.probeTimeout = .seconds(5)
    let topology = running(try PostgresTopology(
        url: url, configuration: configuration, logger: logger, instrumentation: instrumentation
    ))
    await topology.refresh()
    return try await body(topology)
}
