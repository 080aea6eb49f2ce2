import CoreMetrics
import Synchronization
import Tracing

/// Where a connect reports what it does: metrics through swift-metrics, traces through
/// swift-distributed-tracing. Names and attributes follow the OpenTelemetry semantic conventions
/// for database clients where one exists (see ``DBMetricName``).
///
/// By default both go to the process-wide backends (`MetricsSystem.bootstrap`,
/// `InstrumentationSystem.bootstrap`); with none bootstrapped, nothing is recorded and the cost
/// is a few no-op calls per transaction.
public struct DBInstrumentation: Sendable {
    /// Where metrics go; `nil` (the default) uses `MetricsSystem.factory`.
    public var metricsFactory: (any MetricsFactory)?
    /// Where spans go; `nil` (the default) uses `InstrumentationSystem.tracer`.
    public var tracer: (any Tracer)?
    /// Trace every statement too, not only transactions. Default `false`.
    public var tracesStatements: Bool
    /// Put a statement's SQL text in its span (`db.query.text`) — never its bound values.
    /// Default `false`: the text may name tables and columns you would rather not export.
    public var recordsStatementText: Bool

    /// Creates an instrumentation configuration.
    /// - Parameters:
    ///   - metricsFactory: Where metrics go; `nil` for `MetricsSystem.factory`.
    ///   - tracer: Where spans go; `nil` for `InstrumentationSystem.tracer`.
    ///   - tracesStatements: Trace every statement too. Default `false`.
    ///   - recordsStatementText: Put a statement's SQL text in its span. Default `false`.
    public init(
        metricsFactory: (any MetricsFactory)? = nil,
        tracer: (any Tracer)? = nil,
        tracesStatements: Bool = false,
        recordsStatementText: Bool = false
    ) {
        self.metricsFactory = metricsFactory
        self.tracer = tracer
        self.tracesStatements = tracesStatements
        self.recordsStatementText = recordsStatementText
    }
}

/// The names of the metrics ContextDB records. Each has the dimension `db.system.name`; those of
/// a connect also `db.client.connection.pool.name` (the connect's label); those of a host also
/// `server.address` and `server.port` — plus the dimensions listed.
public enum DBMetricName {
    /// Timer: how long a session waited to lease a connection (OpenTelemetry
    /// `db.client.connection.wait_time`).
    public static let connectionWaitTime = "db.client.connection.wait_time"
    /// Timer: how long a session held its connection (`db.client.connection.use_time`).
    public static let connectionUseTime = "db.client.connection.use_time"
    /// Gauge: open connections of a host's pool, by `db.client.connection.state` (`idle`, `used`).
    public static let connectionCount = "db.client.connection.count"
    /// Gauge: leases waiting for a connection (`db.client.connection.pending_requests`).
    public static let pendingRequests = "db.client.connection.pending_requests"
    /// Counter: leases that waited past the lease timeout (`db.client.connection.timeouts`).
    public static let connectionTimeouts = "db.client.connection.timeouts"
    /// Timer: each `BEGIN`, `COMMIT`, `ROLLBACK` and statement (`db.client.operation.duration`),
    /// by `db.operation.name`, with `error.type` when it failed.
    public static let operationDuration = "db.client.operation.duration"
    /// Counter: ended transactions, by `contextdb.transaction.outcome` (`commit`, `rollback`,
    /// `commit_failed`, `commit_unknown` — a `COMMIT` whose answer was lost).
    public static let transactions = "contextdb.transactions"
    /// Counter: sessions that moved to another host because their first lease failed.
    public static let failovers = "contextdb.failovers"
    /// Counter: routing decisions, by `contextdb.routing.role` and `contextdb.routing.reason`.
    public static let routingDecisions = "contextdb.routing.decisions"
    /// Gauge: how far a replica's replay lags, in bytes (`contextdb.replica.lag`, with
    /// `unit=bytes`) and seconds (`unit=seconds`).
    public static let replicaLag = "contextdb.replica.lag"
    /// Gauge: 1 while a host is healthy, 0 while it is down.
    public static let hostHealth = "contextdb.host.health"
    /// Timer: how long a read waited for a replica to reach the request's own writes.
    public static let consistencyWaitTime = "contextdb.consistency.wait_time"
}

/// The host hook's reason for a session's host, added to each of its transactions' spans as a
/// `contextdb.routing` event.
final class DBRoutingNote: Sendable {
    let role: String?
    let reason: String?

    init(role: String?, reason: String?) {
        self.role = role
        self.reason = reason
    }

    /// The event: `contextdb.routing.role`, `contextdb.routing.reason` and the host.
    func event(host: String) -> SpanEvent {
        var attributes: SpanAttributes = [:]
        if let role { attributes["contextdb.routing.role"] = role }
        if let reason { attributes["contextdb.routing.reason"] = reason }
        attributes["server.address"] = DBHostInstruments.split(host).address
        return SpanEvent(name: "contextdb.routing", attributes: attributes)
    }
}

/// How a transaction ended, for ``DBMetricName/transactions`` and its span.
enum DBTransactionOutcome: String, Sendable, CaseIterable {
    case commit
    case rollback
    case commitFailed = "commit_failed"
    /// `COMMIT` was sent and its answer lost: it may have committed.
    case commitUnknown = "commit_unknown"
}

/// A connect's metrics and tracer for one host, made once per host: recording is then a call
/// on a ready handler, no lookup.
package final class DBHostInstruments: Sendable {
    let tracer: any Tracer
    /// Whether `tracer` records anything: `false` for swift-distributed-tracing's `NoOpTracer`
    /// (no tracer bootstrapped), so transactions then start no span at all.
    let traces: Bool
    let tracesStatements: Bool
    let recordsStatementText: Bool
    private let factory: any MetricsFactory
    /// `db.system.name`, `db.client.connection.pool.name`, `server.address`, `server.port`.
    let dimensions: [(String, String)]
    private let systemName: String
    private let namespace: String?
    private let address: String
    private let port: Int?
    let label: String

    let waitTime: Timer
    let useTime: Timer
    let failovers: Counter
    private let outcomes: [DBTransactionOutcome: Counter]
    private let operations: [String: Timer]
    /// Timers of statements (`SELECT`, …) and of failures (by operation and `error.type`),
    /// made on first use and kept: recording is then a lookup, not a registration.
    private let madeTimers = Mutex<[String: Timer]>([:])

    init(instrumentation: DBInstrumentation, label: String, host: String, systemName: String, namespace: String?) {
        let factory = instrumentation.metricsFactory ?? MetricsSystem.factory
        self.factory = factory
        let tracer = instrumentation.tracer ?? InstrumentationSystem.tracer
        self.tracer = tracer
        self.traces = !(tracer is NoOpTracer)
        self.tracesStatements = instrumentation.tracesStatements && !(tracer is NoOpTracer)
        self.recordsStatementText = instrumentation.recordsStatementText
        self.label = label
        self.systemName = systemName
        self.namespace = namespace
        (address, port) = Self.split(host)
        let dimensions = Self.dimensions(label: label, host: host, systemName: systemName)
        self.dimensions = dimensions
        waitTime = Timer(label: DBMetricName.connectionWaitTime, dimensions: dimensions, factory: factory)
        useTime = Timer(label: DBMetricName.connectionUseTime, dimensions: dimensions, factory: factory)
        failovers = Counter(label: DBMetricName.failovers, dimensions: dimensions, factory: factory)
        var outcomes: [DBTransactionOutcome: Counter] = [:]
        for outcome in DBTransactionOutcome.allCases {
            outcomes[outcome] = Counter(
                label: DBMetricName.transactions,
                dimensions: dimensions + [("contextdb.transaction.outcome", outcome.rawValue)], factory: factory
            )
        }
        self.outcomes = outcomes
        var operations: [String: Timer] = [:]
        for name in ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT"] {
            operations[name] = Timer(
                label: DBMetricName.operationDuration, dimensions: dimensions + [("db.operation.name", name)], factory: factory
            )
        }
        self.operations = operations
    }

    /// A host's dimensions: `db.system.name`, `db.client.connection.pool.name`,
    /// `server.address`, `server.port`.
    static func dimensions(label: String, host: String, systemName: String) -> [(String, String)] {
        let (address, port) = split(host)
        var dimensions = [("db.system.name", systemName), ("db.client.connection.pool.name", label), ("server.address", address)]
        if let port { dimensions.append(("server.port", String(port))) }
        return dimensions
    }

    /// `"db1:5432"` as address and port; `"[::1]:5432"` as `::1` and 5432; a host without a
    /// port as itself.
    static func split(_ host: String) -> (address: String, port: Int?) {
        guard let colon = host.lastIndex(of: ":"), let port = Int(host[host.index(after: colon)...]),
              host.first == "[" || !host[..<colon].contains(":")
        else { return (host, nil) }
        let address = host[..<colon]
        return (address.hasPrefix("[") && address.hasSuffix("]") ? String(address.dropFirst().dropLast()) : String(address), port)
    }

    /// Counts an ended transaction.
    func count(_ outcome: DBTransactionOutcome) {
        outcomes[outcome]?.increment()
    }

    /// Records an operation's duration; a failed one with its `error.type`.
    func recordOperation(_ name: String, since start: ContinuousClock.Instant, error: (any Error)? = nil) {
        let elapsed = start.duration(to: .now)
        if error == nil, let timer = operations[name] { return timer.record(duration: elapsed) }
        let errorType = error.map(Self.errorType)
        let key = errorType.map { name + "\u{0}" + $0 } ?? name
        let timer = madeTimers.withLock { timers in
            if let timer = timers[key] { return timer }
            var dimensions = self.dimensions + [("db.operation.name", name)]
            if let errorType { dimensions.append(("error.type", errorType)) }
            let timer = Timer(label: DBMetricName.operationDuration, dimensions: dimensions, factory: factory)
            timers[key] = timer
            return timer
        }
        timer.record(duration: elapsed)
    }

    /// An error's `error.type`: a ``DBError``'s code (`connectionLost`), otherwise the error's
    /// type name.
    static func errorType(_ error: any Error) -> String {
        guard let error = error as? DBError else { return String(describing: type(of: error)) }
        return "\(error.code)"
    }

    /// Marks `span` failed with the error's `error.type` (see ``errorType(_:)``) — not the
    /// error's text, which may quote a value the server rejected.
    static func fail(_ span: any Span, with error: any Error) {
        span.attributes["error.type"] = errorType(error)
        span.setStatus(SpanStatus(code: .error))
    }

    /// Starts a span for a transaction or a statement — a child of `parent` (a statement's
    /// transaction), else of the task's current context (the request's span) — with the
    /// connection's attributes.
    /// `nil` when no tracer is set up (`NoOpTracer`): then nothing is built at all.
    func startSpan(_ name: String, parent: ServiceContext? = nil) -> (any Span)? {
        guard traces else { return nil }
        let span = tracer.startSpan(name, context: parent ?? ServiceContext.current ?? .topLevel, ofKind: .client)
        guard span.isRecording else { return span }  // a sampled-out span: no attributes to build
        span.attributes["db.system.name"] = systemName
        if let namespace { span.attributes["db.namespace"] = namespace }
        span.attributes["server.address"] = address
        if let port { span.attributes["server.port"] = port }
        span.attributes["db.client.connection.pool.name"] = label
        return span
    }
}

extension Timer {
    /// Records a `Duration`.
    package func record(duration: Duration) {
        let (seconds, attoseconds) = duration.components
        recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
