// Helpers shared by the test targets (not a product: nothing here ships).
import ContextDB
import Synchronization
import Testing

/// Expects `body` to throw a ``DBError`` with `code`, and returns it for more checks.
@discardableResult
public func expectDBError(
    _ code: DBError.Code,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async -> DBError? {
    let error = await #expect(throws: DBError.self, sourceLocation: sourceLocation) { try await body() }
    #expect(error?.code == code, "got \(String(describing: error))", sourceLocation: sourceLocation)
    return error
}

/// A one-shot signal between tasks.
public final class Signal: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    public init() { (stream, continuation) = AsyncStream.makeStream() }
    public func fire() { continuation.yield() }
    public func wait() async { for await _ in stream { return } }
}

/// A thread-safe counter.
public final class Counter: Sendable {
    private let count = Mutex(0)
    public init() {}
    public func increment() { count.withLock { $0 += 1 } }
    public var value: Int { count.withLock { $0 } }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; records an issue then,
/// saying `what` did not happen.
public func eventually(
    _ what: String, timeout: Duration = .seconds(15), sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("not within \(timeout): \(what)", sourceLocation: sourceLocation)
}
