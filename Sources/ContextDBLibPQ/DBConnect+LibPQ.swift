import ContextDB
import ContextDBPostgres
import Logging

extension DBConnect where Engine == LibPQEngine {
    /// The host a connect without routing uses: libpq connects as the connection string, the
    /// `PG*` environment and the service file say (several hosts and `target_session_attrs`
    /// included). A session's `host` is this name; the server a connection reached is
    /// ``LibPQConnection/server``.
    public static var conninfoHost: String { "conninfo" }

    /// Declares a database reached through libpq. Nothing connects until a session runs its
    /// first statement.
    ///
    /// Without `chooseHost`, libpq picks the server as the string says — `PGHOST`, a service,
    /// a Unix socket, `target_session_attrs=read-write` among several hosts. With it (a
    /// `PostgresTopology` hook: `primaryHook(for:)`), each
    /// chosen `host:port` gets an engine whose connections go there, with the string's other
    /// settings.
    /// - Parameters:
    ///   - label: A name for logs and errors.
    ///   - conninfo: A libpq connection string: a URI or `key=value` pairs; may be empty (the
    ///     environment then says everything).
    ///   - options: How sessions open transactions (read-only, isolation level).
    ///   - maximumConnections: The most connections per host. Default 20.
    ///   - leaseTimeout: The longest a lease waits for a connection. Default 30 seconds.
    ///   - statementTimeout: The deadline of each statement (cancelled past it). Default none.
    ///   - readYourWrites: Record each committed write's WAL position, so reads through a
    ///     replica hook wait for it. Default `false`.
    ///   - logger: Where the engines log.
    ///   - chooseHost: A routing hook; `nil` to let libpq choose.
    ///   - instrumentation: Where metrics and spans go.
    /// - Throws: `DBError.Code.invalidConfiguration` for a string libpq rejects (the message
    ///   never contains the password).
    public convenience init(
        label: String,
        conninfo: String,
        options: DBSessionOptions = DBSessionOptions(),
        maximumConnections: Int = 20,
        leaseTimeout: Duration = .seconds(30),
        statementTimeout: Duration? = nil,
        readYourWrites: Bool = false,
        logger: Logger = Logger(label: "ContextDB.LibPQ"),
        chooseHost: ChooseHost? = nil,
        instrumentation: DBInstrumentation = DBInstrumentation()
    ) throws {
        _ = try LibPQConninfo(conninfo)  // a bad string fails here, not at the first session
        self.init(
            label: label, host: chooseHost == nil ? Self.conninfoHost : nil, options: options, chooseHost: chooseHost,
            instrumentation: instrumentation,
            normalizeHost: { host in
                host == Self.conninfoHost ? host : try PostgresEndpoint(parsing: host).description
            }
        ) { host in
            try LibPQEngine(
                conninfo: conninfo,
                endpoint: host == Self.conninfoHost ? nil : try PostgresEndpoint(parsing: host),
                maximumConnections: maximumConnections, leaseTimeout: leaseTimeout, statementTimeout: statementTimeout,
                capturesCommitLSN: readYourWrites, instrumentation: instrumentation, poolName: label, logger: logger
            )
        }
    }
}
