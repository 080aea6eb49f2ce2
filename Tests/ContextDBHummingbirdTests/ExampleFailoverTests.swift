import ContextDB
import ContextDBExampleSupport
import ContextDBPostgres
import ExampleTestSupport
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Synchronization
import ContextDBTesting
import Testing
import TestSupport

@testable import ContextDBExample

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The example over HTTP while its primary stops and a replica is promoted — or never is
/// (issue "A failover that costs clients latency, not errors"). Each test on a cluster of its own.
@Suite(.serialized, .enabled(if: TestCluster.isAvailable), .timeLimit(.minutes(4)))
struct ExampleFailoverTests {
    /// Writers posting at a steady rate through `stop-primary` → 2.5 s → `promote`: every request
    /// that started once the primary was down waited for the promotion and was answered 201 on
    /// the new primary. A transaction the stopping server ended mid-way may fail (503: a statement
    /// of it had reached the server, so it is never replayed); nothing acknowledged is lost and
    /// nothing is written twice. The window's latencies are printed.
    @Test func writersThroughAFailoverSeeLatencyNotErrors() async throws {
        try await ScratchCluster.with(primaryPort: 27542, replicas: 1) { cluster in
            let database = try ExampleDatabase(url: cluster.url, logger: Logger(label: "failover"))
            let app = try await buildApplication(database: database, port: 0)
            let clock = ContinuousClock()
            let timeline = Timeline(clock: clock)
            try await app.test(.live) { client in
                let port = try #require(client.port)
                let load = SteadyWriters(port: port, writers: 4, interval: .milliseconds(50), clock: clock)
                let requests = try await withThrowingTaskGroup(of: [SteadyWriters.Request].self) { group in
                    group.addTask { try await load.run() }
                    group.addTask {
                        defer { load.stop() }
                        try await Task.sleep(for: .seconds(1))
                        timeline.mark("stop")
                        try await cluster.run("stop-primary")
                        timeline.mark("stopped")
                        // A client that hangs up while its request waits for the primary.
                        try await postAndHangUp(port: port, text: "hung up", after: .milliseconds(300))
                        try await Task.sleep(for: .milliseconds(2_200))
                        timeline.mark("promote")
                        try await cluster.run("promote", "1")
                        timeline.mark("promoted")
                        try await Task.sleep(for: .seconds(2))
                        return []
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                let (stop, stopped, promote) = try (timeline["stop"], timeline["stopped"], timeline["promote"])

                // Requests were under way while no primary was known: they waited for the
                // promotion, and every one that started once the old primary was down (after
                // `pg_ctl stop` had ended its connections) succeeded.
                #expect(requests.contains { $0.started < promote && $0.ended > promote }, "requests waited for the promotion")
                let afterStop = requests.filter { $0.started >= stopped }
                #expect(afterStop.count > 50)
                let failedAfterStop = afterStop.filter { $0.status != .created }
                #expect(failedAfterStop.isEmpty, "\(failedAfterStop.count) requests failed: \(failedAfterStop)")
                // Failures only for transactions under way while the server stopped: a 503 when
                // the server ended it before its COMMIT, a 500 when COMMIT was sent and its answer
                // lost (it may have committed: commitOutcomeUnknown, never retried).
                let failed = requests.filter { $0.status != .created }
                #expect(failed.allSatisfy { $0.started < stopped && $0.ended > stop }, "\(failed)")
                #expect(failed.allSatisfy {
                    ($0.status == .serviceUnavailable && $0.retryAfter == "1") || $0.status == .internalServerError
                }, "\(failed)")

                // Every acknowledged write is on the new primary, once.
                let acknowledged = requests.compactMap(\.id)
                let stored = try await rows(on: cluster.replicaPorts[0], cluster: cluster)
                #expect(Set(acknowledged).isSubset(of: Set(stored.map(\.id))), "acknowledged writes lost")
                let texts = stored.map(\.text)
                #expect(Set(texts).count == texts.count, "a write landed twice")
                let outcomeUnknown = failed.filter { $0.status == .internalServerError }.count
                #expect(stored.count <= acknowledged.count + 1 + outcomeUnknown, "only the hung-up client's write and commits whose answer was lost are unacknowledged")

                // Nothing left behind: no session waits, holds a connection, or idles in a transaction.
                #expect(database.topology.sessionsWaitingForPrimary == 0)
                try await eventually("the connections are back") { ExampleHarness.leased(database) == 0 }
                #expect(try await activeTransactions(on: cluster.replicaPorts[0], cluster: cluster).isEmpty)

                let window = requests.filter { $0.ended > stop && $0.started < promote + .seconds(1) }
                let followed = requests.filter { $0.started < promote && $0.ended > promote }
                    .map { promote.duration(to: $0.ended) }.max() ?? .zero
                print("""
                    failover window: \(latencyReport(window)); the waiting requests answered at most \
                    \(milliseconds(followed)) ms after `promote` began; failed: \(failed.count) of \(requests.count) requests
                    """)
            }
        }
    }

    /// The same load with no promotion: every request that finds no primary fails with 503 and
    /// `Retry-After` within `primaryWaitTimeout` + 1 s, and writes nothing.
    @Test func withNoPromotionEveryWaitingRequestFailsWithinTheBound() async throws {
        try await ScratchCluster.with(primaryPort: 27552, replicas: 1) { cluster in
            var configuration = ExampleDatabase.topologyConfiguration
            configuration.primaryWaitTimeout = .seconds(2)
            let bound = configuration.primaryWaitTimeout + .seconds(1)
            let database = try ExampleDatabase(url: cluster.url, topology: configuration, logger: Logger(label: "failover"))
            let app = try await buildApplication(database: database, port: 0)
            let clock = ContinuousClock()
            let timeline = Timeline(clock: clock)
            try await app.test(.live) { client in
                let port = try #require(client.port)
                let load = SteadyWriters(port: port, writers: 4, interval: .milliseconds(100), clock: clock)
                let requests = try await withThrowingTaskGroup(of: [SteadyWriters.Request].self) { group in
                    group.addTask { try await load.run() }
                    group.addTask {
                        defer { load.stop() }
                        try await Task.sleep(for: .milliseconds(500))
                        try await cluster.run("stop-primary")
                        timeline.mark("stopped")
                        try await postAndHangUp(port: port, text: "hung up", after: .milliseconds(300))
                        try await Task.sleep(for: .seconds(5))
                        return []
                    }
                    return try await group.reduce(into: []) { $0 += $1 }
                }
                let down = try timeline["stopped"]
                let waiting = requests.filter { $0.started >= down }
                #expect(waiting.count >= load.writers, "every writer waited")
                #expect(waiting.allSatisfy { $0.status == .serviceUnavailable && $0.retryAfter == "1" }, "\(waiting.map(\.status))")
                let slowest = waiting.map { $0.started.duration(to: $0.ended) }.max() ?? .zero
                #expect(slowest <= bound, "a request waited \(slowest)")
                #expect(database.topology.sessionsWaitingForPrimary == 0)
                try await eventually("the connections are back") { ExampleHarness.leased(database) == 0 }

                // Nothing was written while the primary was down, nor twice: beyond the
                // acknowledged rows, only a COMMIT under way at the stop may have landed (a 500).
                try await cluster.run("start-primary")
                let stored = try await rows(on: cluster.primaryPort, cluster: cluster)
                let acknowledged = Set(requests.compactMap(\.id))
                #expect(acknowledged.isSubset(of: Set(stored.map(\.id))))
                #expect(stored.count <= acknowledged.count + requests.filter { $0.status == .internalServerError }.count)
                #expect(!stored.contains { $0.text == "hung up" })
                print("no promotion: \(waiting.count) waiting requests, \(latencyReport(waiting))")
            }
        }
    }

    /// The rows of `items` on one server of the cluster.
    private func rows(on port: Int, cluster: ScratchCluster) async throws -> [(id: Int, text: String)] {
        try await withServer(port, of: cluster) { session in
            try await session.query("SELECT id, text FROM items ORDER BY id").map { try $0.decode((Int, String).self) }
        }
    }

    /// The states of the server's client connections that are in a transaction.
    private func activeTransactions(on port: Int, cluster: ScratchCluster) async throws -> [String] {
        try await withServer(port, of: cluster) { session in
            try await session.query(
                "SELECT state FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
            ).map { try $0.decode(String.self) }
        }
    }

    private func withServer<R>(
        _ port: Int, of cluster: ScratchCluster, _ body: (DBSession<PostgresEngine>) async throws -> R
    ) async throws -> R {
        let connect = try DBConnect(label: "check", url: TestCluster.url(host: "127.0.0.1", port: port))
        return try await withRunningServices([connect]) { try await connect.withSession(body) }
    }
}

/// When each step of a test happened.
private final class Timeline: Sendable {
    let clock: ContinuousClock
    private let marks = Mutex<[String: ContinuousClock.Instant]>([:])

    init(clock: ContinuousClock) { self.clock = clock }

    func mark(_ step: String) { marks.withLock { $0[step] = clock.now } }

    subscript(step: String) -> ContinuousClock.Instant {
        get throws { try #require(marks.withLock { $0[step] }, "no step \(step)") }
    }
}

/// Clients that each post `POST /items` every `interval` until stopped, and record each answer.
private final class SteadyWriters: Sendable {
    struct Request: Sendable, CustomStringConvertible {
        var started: ContinuousClock.Instant
        var ended: ContinuousClock.Instant
        var status: HTTPResponse.Status
        var retryAfter: String?
        var id: Int?
        var description: String { "\(status.code) after \(started.duration(to: ended))" }
    }

    let port: Int
    let writers: Int
    let interval: Duration
    let clock: ContinuousClock
    private let stopped = Atomic<Bool>(false)

    init(port: Int, writers: Int, interval: Duration, clock: ContinuousClock) {
        self.port = port
        self.writers = writers
        self.interval = interval
        self.clock = clock
    }

    func stop() { stopped.store(true, ordering: .relaxed) }

    func run() async throws -> [Request] {
        try await withThrowingTaskGroup(of: [Request].self) { group in
            for writer in 0..<writers {
                group.addTask {
                    try await TestClient.withClient(host: "127.0.0.1", port: self.port) { http in
                        var requests: [Request] = []
                        var next = self.clock.now
                        while !self.stopped.load(ordering: .relaxed) {
                            let started = self.clock.now
                            let response = try await http.post(
                                "/items", body: ByteBuffer(string: #"{"text":"writer \#(writer) request \#(requests.count)"}"#)
                            )
                            requests.append(Request(
                                started: started, ended: self.clock.now, status: response.status,
                                retryAfter: response.headers[.retryAfter], id: json(response.body)["id"] as? Int
                            ))
                            next = max(next + self.interval, self.clock.now)
                            try await Task.sleep(until: next)
                        }
                        return requests
                    }
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
    }
}

/// Sends `POST /items` on a connection of its own and closes it after `delay`, unanswered or not.
private func postAndHangUp(port: Int, text: String, after delay: Duration) async throws {
    #if canImport(Glibc)
    let socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    #else
    let socket = Darwin.socket(AF_INET, SOCK_STREAM, 0)
    #endif
    try #require(socket >= 0)
    defer { close(socket) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    try #require(connected == 0)
    let body = #"{"text":"\#(text)"}"#
    let request = "POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
    let sent = request.withCString { send(socket, $0, strlen($0), 0) }
    try #require(sent == request.utf8.count)
    try await Task.sleep(for: delay)
}

/// p50, p99 and the maximum of the requests' latencies, in milliseconds.
private func latencyReport(_ requests: [SteadyWriters.Request]) -> String {
    let sorted = requests.map { $0.started.duration(to: $0.ended) }.sorted()
    guard !sorted.isEmpty else { return "no requests" }
    func percentile(_ p: Double) -> String {
        "\(milliseconds(sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)])) ms"
    }
    return "\(sorted.count) requests, p50 \(percentile(0.5)), p99 \(percentile(0.99)), max \(percentile(1))"
}

private func milliseconds(_ duration: Duration) -> Int {
    Int(Double(duration.components.seconds) * 1_000 + Double(duration.components.attoseconds) / 1e15)
}
