/// What the code running now asks of replica reads, set by ``withPrimaryReads(isolation:_:)``
/// and ``withMaxStaleness(_:isolation:_:)`` and read by host hooks through
/// ``DBHostRequest/readPreference`` — GitLab's `use_primary`, pg-status' per-call lag.
///
/// It applies to the sessions created inside the scope: a session the request already has
/// keeps its host.
public struct DBReadPreference: Sendable, Hashable {
    /// Read from the primary, not from a replica.
    public var primaryOnly = false
    /// The most a replica may lag behind the primary in time to serve, in place of the hook's
    /// own limit; `nil`: the hook's.
    public var maximumStaleness: Duration?

    /// No preference: the hooks' own rules.
    public init() {}

    /// The preference of the current task: the innermost scope's.
    public static var current: DBReadPreference { active }

    @TaskLocal static var active = DBReadPreference()
}

/// Runs `body` with its new sessions' reads on the primary: a replica connect's hook routes
/// them there, fresh as a write would see them, even while replicas are fit.
/// - Parameters:
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - body: The work.
/// - Returns: What `body` returns.
public func withPrimaryReads<R>(
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async rethrows -> R {
    try await withReadPreference({ $0.primaryOnly = true }, isolation: isolation, body)
}

/// Runs `body` with a replica lag limit of its own: its new sessions' reads may go to a replica
/// that lags at most `staleness` in time, in place of the hook's limit (the byte limit still
/// applies). Tighter for a page that must be fresh, looser for a report that may be old.
/// - Parameters:
///   - staleness: The most a replica may lag, e.g. `.seconds(2)`.
///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
///   - body: The work.
/// - Returns: What `body` returns.
public func withMaxStaleness<R>(
    _ staleness: Duration,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> R
) async rethrows -> R {
    try await withReadPreference({ $0.maximumStaleness = staleness }, isolation: isolation, body)
}

/// Runs `body` with the current read preference changed by `change`.
private func withReadPreference<R>(
    _ change: (inout DBReadPreference) -> Void,
    isolation: isolated (any Actor)?,
    _ body: () async throws -> R
) async rethrows -> R {
    var preference = DBReadPreference.current
    change(&preference)
    return try await DBReadPreference.$active.withValue(preference, operation: body, isolation: isolation)
}
