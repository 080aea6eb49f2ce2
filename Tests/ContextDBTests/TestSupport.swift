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

/// Serves one "request" the way DBSessionMiddleware does (see `withDBRequest`); a thrown error
/// or a failed commit becomes a 500. Returns the status sent.
func serve(_ handler: () async throws -> Int) async -> Int {
    do {
        return try await withDBRequest(statusCode: { $0 }, handler)
    } catch {
        return 500
    }
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
