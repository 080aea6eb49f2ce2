import ContextDB
import Synchronization
import Testing

/// Expects `body` to throw a ``DBError`` with `code`, and returns it for more checks.
@discardableResult
func expectDBError(
    _ code: DBError.Code,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async -> DBError? {
    let error = await #expect(throws: DBError.self, sourceLocation: sourceLocation) { try await body() }
    #expect(error?.code == code, "got \(String(describing: error))", sourceLocation: sourceLocation)
    return error
}

/// Serves one "request" the way DBSessionMiddleware does: a new context, commit below 400,
/// roll back otherwise or on error, close everything. Returns the status sent.
func serve(_ handler: () async throws -> Int) async -> Int {
    let context = DBContext()
    var status: Int
    do {
        status = try await context.run(handler)
    } catch {
        status = 500
    }
    do {
        try await context.finish(statusCode: status)
    } catch {
        status = 500
    }
    await context.end()
    return status
}

/// A one-shot signal between tasks.
final class Signal: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    init() { (stream, continuation) = AsyncStream.makeStream() }
    func fire() { continuation.yield() }
    func wait() async { for await _ in stream { return } }
}

/// A thread-safe counter.
final class Counter: Sendable {
    private let count = Mutex(0)
    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}
