import ServiceLifecycle

/// Runs `services` — connects, a `PostgresTopology` — as child tasks while `body` runs, then
/// cancels them and waits until they have ended: for tests and scripts that use connects
/// without a `ServiceGroup`.
///
/// ```swift
/// try await withRunningServices([primary, replica]) {
///     try await withDBContext { try await primary.session().execute("SELECT 1") }
/// }
/// ```
/// Cancelling a connect's `run()` shuts its engines down (see `DBConnect.run()`).
/// - Parameters:
///   - services: What to run; each is run once.
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - body: The work that uses the services.
/// - Returns: What `body` returns.
/// - Throws: What `body` throws, or what a service threw.
public func withRunningServices<R>(
    _ services: [any Service],
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async throws -> R {
    try await withThrowingTaskGroup(of: Void.self, returning: R.self) { group in
        for service in services {
            group.addTask { try await service.run() }
        }
        do {
            let result = try await body()
            group.cancelAll()
            try await group.waitForAll()
            return result
        } catch {
            group.cancelAll()
            throw error
        }
    }
}
