import ContextDB
import ContextDBHummingbird
import ContextDBPostgres
import Foundation
import Hummingbird

/// The Swift twin of `Benchmarks/python/app.py` for `scripts/bench-python.sh`: the same four
/// endpoints and SQL on ContextDB (Hummingbird, `DBSessionMiddleware`, a primary and a read-only
/// replica connect, pool 20 each), as a user would write them.
///
/// Usage: `TwinServer PORT` with `BENCH_PRIMARY_URL` and `BENCH_REPLICA_URL` (libpq URIs);
/// `RESET_SESSION_STATE=off` skips the session reset; `STATEMENT_CACHE_SIZE=0` turns prepared
/// statements off.
@main
struct TwinServer {
    struct Text: ResponseEncodable {
        let text: String?
    }

    /// `{"ok": true}`, as the Python app answers.
    struct OK: ResponseEncodable {
        var ok = true
    }

    static func main() async throws {
        let environment = ProcessInfo.processInfo.environment
        let port = CommandLine.arguments.dropFirst().first.flatMap(Int.init) ?? 8291
        let resets = environment["RESET_SESSION_STATE"] != "off"
        let cacheSize = environment["STATEMENT_CACHE_SIZE"].flatMap(Int.init) ?? 100
        let primary = try DBConnect(
            label: "primary", url: environment["BENCH_PRIMARY_URL"]!, maximumConnections: 20, resetsSessionState: resets,
            statementCacheSize: cacheSize
        )
        let replica = try DBConnect(
            label: "replica", url: environment["BENCH_REPLICA_URL"]!, options: DBSessionOptions(readOnly: true),
            maximumConnections: 20, resetsSessionState: resets, statementCacheSize: cacheSize
        )

        let router = Router()
        router.add(middleware: DBSessionMiddleware())
        router.post("/write") { _, _ -> OK in
            try await primary.session().execute("INSERT INTO example (text) VALUES (\("bench"))")
            return OK()
        }
        router.get("/read") { request, _ -> Text in
            let id = request.uri.queryParameters.get("id", as: Int.self) ?? 1
            return Text(text: try await replica.session().queryValue("SELECT text FROM reads WHERE id = \(id)", as: String.self))
        }
        router.get("/read_write") { request, _ -> Text in
            let id = request.uri.queryParameters.get("id", as: Int.self) ?? 1
            try await primary.session().execute("INSERT INTO example (text) VALUES (\("bench"))")
            return Text(text: try await replica.session().queryValue("SELECT text FROM reads WHERE id = \(id)", as: String.self))
        }
        router.get("/noop") { _, _ -> OK in OK() }

        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: port)),
            services: [primary, replica]  // their pools run beside the server and close after it
        )
        try await app.runService()
    }
}
