import ContextDB
import NullEngine
import Dispatch
import Prometheus

/// Runs one of the in-memory benchmarks' bodies N times in a plain loop, for
/// `valgrind --tool=callgrind` (instruction counts are stable on a noisy machine; see README.md).
///
/// Usage: ProfileHarness lookup|lifecycle|lifecycle-prometheus [N]
///
/// `lifecycle-prometheus` is `lifecycle` with every metric recorded into a Prometheus registry
/// (what the example's `GET /metrics` serves): the difference is what a metrics backend costs.
@main
struct ProfileHarness {
    /// Synchronous on purpose: valgrind 3.19 crashes on an `async` main, whose main thread
    /// parks in dispatch's `sigsuspend`.
    static func main() {
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            do { try await run() } catch { fatalError("\(error)") }
            done.signal()
        }
        done.wait()
    }

    static func run() async throws {
        let arguments = CommandLine.arguments.dropFirst()
        let mode = arguments.first ?? "lifecycle"
        let count = arguments.dropFirst().first.flatMap(Int.init) ?? 10_000
        let instrumentation = mode == "lifecycle-prometheus"
            ? DBInstrumentation(metricsFactory: PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()))
            : DBInstrumentation()
        let null = DBConnect(label: "null", host: "null", instrumentation: instrumentation) { _ in NullEngine() }
        switch mode {
        case "lookup":
            try await withDBContext {
                _ = try await null.session()
                for _ in 0..<count { _ = try await null.session() }
            }
        case "lifecycle", "lifecycle-prometheus":
            for _ in 0..<count {
                try await withDBContext {
                    try await null.session().withConnection { _ in }
                }
            }
        default:
            fatalError("unknown mode \(mode); use lookup, lifecycle or lifecycle-prometheus")
        }
    }
}
