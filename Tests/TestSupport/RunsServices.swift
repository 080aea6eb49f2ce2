import ServiceLifecycle
import Testing

/// A test trait: services a test registers with ``running(_:sourceLocation:)`` run as child
/// tasks of the test's scope, and are cancelled (a connect then closes its engines) when the
/// test ends — structured, and one line per connect in the test.
public struct RunsServices: TestTrait, SuiteTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        guard testCase != nil else { return try await function() }  // a suite: its tests get their own scope
        let (services, queue) = AsyncStream.makeStream(of: (any Service).self)
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                await withDiscardingTaskGroup { running in
                    for await service in services {
                        running.addTask {
                            do { try await service.run() } catch { Issue.record("a service of the test failed: \(error)") }
                        }
                    }
                }
            }
            try await ServiceQueue.$current.withValue(ServiceQueue(queue)) { try await function() }
            queue.finish()
            group.cancelAll()
        }
    }
}

extension Trait where Self == RunsServices {
    /// Runs the services a test registers with ``running(_:sourceLocation:)``.
    public static var runsServices: Self { RunsServices() }
}

/// Where ``running(_:sourceLocation:)`` sends services: the current test's scope.
final class ServiceQueue: Sendable {
    @TaskLocal static var current: ServiceQueue?

    let queue: AsyncStream<any Service>.Continuation

    init(_ queue: AsyncStream<any Service>.Continuation) { self.queue = queue }
}

/// Runs `service` until the test ends (the suite or test needs the ``RunsServices`` trait) and
/// returns it.
public func running<S: Service>(_ service: S, sourceLocation: SourceLocation = #_sourceLocation) -> S {
    guard let current = ServiceQueue.current else {
        Issue.record("running(_:) needs the .runsServices trait on the test or its suite", sourceLocation: sourceLocation)
        return service
    }
    current.queue.yield(service)
    return service
}
