import Hummingbird
import Prometheus

/// `GET /metrics`: every metric of the process in Prometheus' text format.
struct MetricsRoutes {
    let registry: PrometheusCollectorRegistry

    func add(to router: Router<BasicRequestContext>) {
        router.get("/metrics") { _, _ -> Response in
            Response(
                status: .ok,
                headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer()))
            )
        }
    }

    /// A metrics factory on `registry` whose names and labels Prometheus accepts: OpenTelemetry's
    /// dots become underscores (`db.client.connection.wait_time` → `db_client_connection_wait_time`).
    static func factory(on registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.nameAndLabelSanitizer = { name, labels in
            (prometheusName(name), labels.map { (prometheusName($0.0), $0.1) })
        }
        return factory
    }

    /// `name` with every character Prometheus does not allow in a name replaced by `_`.
    static func prometheusName(_ name: String) -> String {
        String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") ? $0 : "_" })
    }
}
