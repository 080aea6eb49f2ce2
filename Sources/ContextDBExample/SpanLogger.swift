import InMemoryTracing
import Logging
import ServiceLifecycle
import Tracing

/// `TRACING=on`: spans go to swift-distributed-tracing's in-process `InMemoryTracer`, and this
/// service logs the finished ones every `interval` — enough to see the request → transaction →
/// statement tree without a collector. For production, bootstrap an exporter (swift-otel).
struct SpanLogger: Service {
    let tracer: InMemoryTracer
    let logger: Logger
    var interval = Duration.seconds(1)

    func run() async throws {
        // Until a graceful shutdown (or cancellation) ends the sleep, then a last flush.
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                flush()
            }
        }
        flush()
    }

    /// Logs and forgets every finished span, one line each.
    func flush() {
        for span in tracer.popFinishedSpans() {
            var metadata: Logger.Metadata = [
                "trace_id": "\(span.traceID)", "span_id": "\(span.spanID)",
                "parent_span_id": "\(span.parentSpanID ?? "-")",
                "duration_ms": "\((span.endInstant.nanosecondsSinceEpoch - span.startInstant.nanosecondsSinceEpoch) / 1_000_000)",
            ]
            span.attributes.forEach { name, value in metadata[name] = "\(value)" }
            if let status = span.status, status.code == .error { metadata["status"] = "error" }
            logger.info("span \(span.operationName)", metadata: metadata)
        }
    }
}
