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
    /// - Throws: `DBError.Code.invalidConfiguration` or `DBError.Code.emptyHost` for a bad URI.
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
