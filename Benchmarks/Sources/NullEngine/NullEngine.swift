import ContextDB

/// An engine that does nothing, to measure ContextDB's own cost (benchmarks and the profile harness).
public struct NullEngine: DatabaseEngine {
    /// A connection that is nothing.
    public struct Connection: Sendable {}

    /// Creates the engine.
    public init() {}

    public func leaseConnection() async throws -> Connection { Connection() }
    public func releaseConnection(_ connection: Connection, reusable: Bool) async {}
    public func execute(_ statement: DBControlStatement, on connection: Connection) async throws -> DBControlResult { .empty }
    public func shutdown() async {}
}
