import ContextDB
import Logging
import PostgresNIO

extension DBConnect where Engine == PostgresEngine {
    /// Declares a PostgreSQL database from a libpq-style URI. Connects nothing yet.
    ///
    /// ```swift
    /// let primary = try DBConnect(label: "primary", url: "postgresql://app:secret@127.0.0.1:5432/app")
    /// let replica = try DBConnect(label: "replica", url: "postgresql://app:secret@127.0.0.1:5433/app",
    ///                             options: DBSessionOptions(readOnly: true))
    /// ```
    /// With several hosts in the URI, the first is the default; `beforeCreateSession` may pick
    /// another with `DBConnect.changeHost(_:)` (as `"host:port"`). Each host gets its own engine.
    ///
    /// Given no hook, the URI routes by itself, as libpq does: `target_session_attrs=read-write`
    /// or `primary` follows the primary, `read-only` or `standby` reads from fit standbys (`READ
    /// ONLY` sessions, no fallback), `prefer-standby` from a fit standby else the primary — each
    /// through a `PostgresTopology` of the URI's hosts that the connect's `run()` runs — and
    /// `load_balance_hosts=random` spreads sessions at random. With `any` (the default) and
    /// several hosts, a session tries them in order until one gives a connection.
    /// `DATABASE_URL=postgresql://…/app?target_session_attrs=standby` alone is a replica connect.
    /// - Parameters:
    ///   - label: A name for logs and errors.
    ///   - url: The URI; several hosts allowed.
    ///   - options: Read-only, isolation level.
    ///   - maximumConnections: Each engine's pool size. Default 20.
    ///   - leaseTimeout: The longest a session waits for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of each statement, `BEGIN`, `COMMIT` and
    ///     `ROLLBACK`: cancelled at the deadline, its connection closed one second later if the
    ///     server answers neither (see ``PostgresEngine/statementTimeout``). Default none.
    ///   - resetsSessionState: Reset each released connection's session state (settings,
    ///     advisory locks, temporary tables, `LISTEN`, cursors) before the next lease (see
    ///     ``PostgresEngine/resetsSessionState``). Default `true`; turn it off only when no code
    ///     changes session state.
    ///   - statementCacheSize: How many statements each connection prepares and reuses (see
    ///     ``PostgresEngine/statementCacheSize``); `0` behind a pooler in transaction mode. Default 100.
    ///   - readYourWrites: Record the WAL position of each committed write in the request
    ///     context, so replica routing can wait for it (see ``PostgresEngine/capturesCommitLSN``).
    ///   - logger: Where engines log.
    ///   - beforeCreateSession: Runs before each session is created; may choose the host with
    ///     `DBConnect.changeHost(_:)` (the Python original's way).
    ///   - chooseHost: Runs before each session is created and returns its host, such as
    ///     ``PostgresTopology/primaryHook()``. Pass it or `beforeCreateSession`, not both.
    ///   - instrumentation: Where metrics and spans go (see `DBInstrumentation`). Default: the
    ///     process-wide backends.
    /// - Throws: `DBError.Code.invalidConfiguration` or `DBError.Code.emptyHost` for a bad URI,
    ///   or for `target_session_attrs` beside a hook of your own.
    public convenience init(
        label: String = "default",
        url: String,
        options: DBSessionOptions = DBSessionOptions(),
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
        statementCacheSize: Int = 100,
        readYourWrites: Bool = false,
        logger: Logger = Logger(label: "ContextDB.Postgres"),
        beforeCreateSession: BeforeCreateSession? = nil,
        chooseHost: ChooseHost? = nil,
        instrumentation: DBInstrumentation = DBInstrumentation()
    ) throws {
        let parsed: PostgresURL
        do {
            parsed = try PostgresURL(url)
        } catch var error as DBError {
            error.connect = label
            throw error
        }
        let defaultPort = parsed.endpoints[0].port
        var options = options
        var chooseHost = chooseHost
        var topology: PostgresTopology?
        if chooseHost == nil, beforeCreateSession == nil {
            (chooseHost, topology) = Self.routing(parsed, options: &options, logger: logger, instrumentation: instrumentation)
        } else if parsed.targetSessionAttrs != .any {
            throw DBError(
                .invalidConfiguration,
                "target_session_attrs=\(parsed.targetSessionAttrs.rawValue) routes by itself: drop it, or pass no chooseHost or beforeCreateSession",
                connect: label
            )
        }
        self.init(
            label: label, host: parsed.endpoints[0].description, options: options,
            beforeCreateSession: beforeCreateSession, chooseHost: chooseHost,
            instrumentation: instrumentation, normalizeHost: { try PostgresEndpoint(parsing: $0, defaultPort: defaultPort).description }
        ) { host in
            try PostgresEngine(
                url: parsed, endpoint: PostgresEndpoint(parsing: host, defaultPort: parsed.endpoints[0].port),
                maximumConnections: maximumConnections, leaseTimeout: leaseTimeout, statementTimeout: statementTimeout,
                resetsSessionState: resetsSessionState, statementCacheSize: statementCacheSize,
                capturesCommitLSN: readYourWrites, instrumentation: instrumentation, poolName: label, logger: logger
            )
        }
        if let topology { runAlongside(topology) }
    }

    /// The routing a URI asks for by itself (libpq's `target_session_attrs` and
    /// `load_balance_hosts`), for a connect given no hook: a topology of the URI's hosts and its
    /// hook, or for `any` the hosts in order (shuffled with `load_balance_hosts=random`), each
    /// the next one's fallback as libpq tries them.
    static func routing(
        _ url: PostgresURL, options: inout DBSessionOptions, logger: Logger, instrumentation: DBInstrumentation
    ) -> (ChooseHost?, PostgresTopology?) {
        let policy: DBReplicaPolicy = url.loadBalanceHosts ? .random : .roundRobin
        func topology() -> PostgresTopology {
            PostgresTopology(url: url, configuration: PostgresTopology.Configuration(), logger: logger, instrumentation: instrumentation)
        }
        switch url.targetSessionAttrs {
        case .any:
            guard url.endpoints.count > 1 else { return (nil, nil) }
            let hosts = url.endpoints.map(\.description)
            let shuffles = url.loadBalanceHosts
            return ({ _ in
                var order = shuffles ? hosts.shuffled() : hosts
                return DBHostChoice(order.removeFirst(), fallbacks: order)
            }, nil)
        case .readWrite, .primary:
            let topology = topology()
            return (topology.primaryHook(), topology)
        case .readOnly, .standby:
            options.readOnly = true
            let topology = topology()
            return (topology.replicaHook(policy: policy, fallbackToPrimary: false), topology)
        case .preferStandby:
            let topology = topology()
            return (topology.replicaHook(policy: policy, fallbackToPrimary: true), topology)
        }
    }

    /// Declares a PostgreSQL database from PostgresNIO's configuration. Connects nothing yet.
    ///
    /// The host of new sessions is `configuration`'s; a host chosen with
    /// `DBConnect.changeHost(_:)` (`"host:port"`) gets an engine with the same configuration
    /// and that address.
    /// - Parameters:
    ///   - label: A name for logs and errors.
    ///   - configuration: Credentials, TLS, pool size and timeouts.
    ///   - options: Read-only, isolation level.
    ///   - leaseTimeout: The longest a session waits for a connection. Default 30 seconds.
    ///   - statementTimeout: The client-side deadline of each statement (see
    ///     ``PostgresEngine/statementTimeout``). Default none.
    ///   - resetsSessionState: Reset each released connection's session state (see
    ///     ``PostgresEngine/resetsSessionState``). Default `true`.
    ///   - statementCacheSize: How many statements each connection prepares and reuses (see
    ///     ``PostgresEngine/statementCacheSize``); `0` behind a pooler in transaction mode. Default 100.
    ///   - readYourWrites: Record the WAL position of each committed write in the request
    ///     context, so replica routing can wait for it (see ``PostgresEngine/capturesCommitLSN``).
    ///   - logger: Where engines log.
    ///   - beforeCreateSession: Runs before each session is created; may choose the host with
    ///     `DBConnect.changeHost(_:)` (the Python original's way).
    ///   - chooseHost: Runs before each session is created and returns its host, such as
    ///     ``PostgresTopology/primaryHook()``. Pass it or `beforeCreateSession`, not both.
    ///   - instrumentation: Where metrics and spans go (see `DBInstrumentation`). Default: the
    ///     process-wide backends.
    public convenience init(
        label: String = "default",
        configuration: PostgresClient.Configuration,
        options: DBSessionOptions = DBSessionOptions(),
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        resetsSessionState: Bool = true,
        statementCacheSize: Int = 100,
        readYourWrites: Bool = false,
        logger: Logger = Logger(label: "ContextDB.Postgres"),
        beforeCreateSession: BeforeCreateSession? = nil,
        chooseHost: ChooseHost? = nil,
        instrumentation: DBInstrumentation = DBInstrumentation()
    ) {
        let base = PostgresEndpoint(host: configuration.host ?? "localhost", port: configuration.port ?? 5432)
        self.init(
            label: label, host: base.description, options: options, beforeCreateSession: beforeCreateSession, chooseHost: chooseHost,
            instrumentation: instrumentation, normalizeHost: { try PostgresEndpoint(parsing: $0, defaultPort: base.port).description }
        ) { host in
            let endpoint = try PostgresEndpoint(parsing: host, defaultPort: base.port)
            var moved = PostgresClient.Configuration(
                host: endpoint.host, port: endpoint.port, username: configuration.username,
                password: configuration.password, database: configuration.database, tls: configuration.tls
            )
            moved.options = configuration.options
            return PostgresEngine(
                configuration: moved, leaseTimeout: leaseTimeout, statementTimeout: statementTimeout,
                resetsSessionState: resetsSessionState, statementCacheSize: statementCacheSize,
                capturesCommitLSN: readYourWrites, instrumentation: instrumentation, poolName: label, logger: logger
            )
        }
    }
}
