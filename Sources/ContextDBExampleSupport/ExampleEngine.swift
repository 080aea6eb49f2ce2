import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import Logging
import PostgresNIO

/// What the examples need of a PostgreSQL engine module: a connect from a URI, and the few
/// statements the routes run. The example picks one with `DATABASE_ENGINE` (`postgresnio`, the
/// default, or `libpq`).
public protocol ExampleEngine: DatabaseEngine {
    /// The connect of one role, routed by `chooseHost`.
    static func exampleConnect(
        label: String, url: String, options: DBSessionOptions, maximumConnections: Int, leaseTimeout: Duration,
        statementTimeout: Duration, resetsSessionState: Bool, readYourWrites: Bool, logger: Logger,
        chooseHost: @escaping DBConnect<Self>.ChooseHost, instrumentation: DBInstrumentation
    ) throws -> DBConnect<Self>
    /// Runs SQL the example wrote itself (the schema), without values.
    static func exampleExecute(_ sql: String, in session: DBSession<Self>) async throws
    /// `INSERT INTO example (text) VALUES ($1)`.
    static func insertExample(_ text: String, in session: DBSession<Self>) async throws
    /// `INSERT INTO items (text) VALUES ($1) RETURNING id`.
    static func insertItem(_ text: String, in session: DBSession<Self>) async throws -> Int?
    /// The text of item `id`, or `nil` when there is no such item.
    static func itemText(_ id: Int, in session: DBSession<Self>) async throws -> String?
    /// `SELECT 1`.
    static func selectOne(in session: DBSession<Self>) async throws
    /// How many connections sessions hold now.
    var leasedConnectionCount: Int { get }
}

extension PostgresEngine: ExampleEngine {
    public static func exampleConnect(
        label: String, url: String, options: DBSessionOptions, maximumConnections: Int, leaseTimeout: Duration,
        statementTimeout: Duration, resetsSessionState: Bool, readYourWrites: Bool, logger: Logger,
        chooseHost: @escaping DBConnect<PostgresEngine>.ChooseHost, instrumentation: DBInstrumentation
    ) throws -> DBConnect<PostgresEngine> {
        try DBConnect(
            label: label, url: url, options: options, maximumConnections: maximumConnections, leaseTimeout: leaseTimeout,
            statementTimeout: statementTimeout, resetsSessionState: resetsSessionState, readYourWrites: readYourWrites,
            logger: logger, chooseHost: chooseHost, instrumentation: instrumentation
        )
    }
    public static func exampleExecute(_ sql: String, in session: DBSession<PostgresEngine>) async throws {
        try await session.execute(PostgresQuery(unsafeSQL: sql))
    }
    public static func insertExample(_ text: String, in session: DBSession<PostgresEngine>) async throws {
        try await session.execute("INSERT INTO example (text) VALUES (\(text))")
    }
    public static func insertItem(_ text: String, in session: DBSession<PostgresEngine>) async throws -> Int? {
        try await session.queryValue("INSERT INTO items (text) VALUES (\(text)) RETURNING id", as: Int.self)
    }
    public static func itemText(_ id: Int, in session: DBSession<PostgresEngine>) async throws -> String? {
        try await session.queryFirst("SELECT text FROM items WHERE id = \(id)")?.decode(String.self)
    }
    public static func selectOne(in session: DBSession<PostgresEngine>) async throws {
        _ = try await session.queryValue("SELECT 1", as: Int.self)
    }
}

extension LibPQEngine: ExampleEngine {
    /// libpq's engine always resets a released connection (`DISCARD ALL`): `resetsSessionState`
    /// does not apply.
    public static func exampleConnect(
        label: String, url: String, options: DBSessionOptions, maximumConnections: Int, leaseTimeout: Duration,
        statementTimeout: Duration, resetsSessionState: Bool, readYourWrites: Bool, logger: Logger,
        chooseHost: @escaping DBConnect<LibPQEngine>.ChooseHost, instrumentation: DBInstrumentation
    ) throws -> DBConnect<LibPQEngine> {
        try DBConnect(
            label: label, conninfo: url, options: options, maximumConnections: maximumConnections, leaseTimeout: leaseTimeout,
            statementTimeout: statementTimeout, readYourWrites: readYourWrites, logger: logger, chooseHost: chooseHost,
            instrumentation: instrumentation
        )
    }
    public static func exampleExecute(_ sql: String, in session: DBSession<LibPQEngine>) async throws {
        try await session.execute(LibPQQuery(stringLiteral: sql))
    }
    public static func insertExample(_ text: String, in session: DBSession<LibPQEngine>) async throws {
        try await session.execute("INSERT INTO example (text) VALUES (\(text))")
    }
    public static func insertItem(_ text: String, in session: DBSession<LibPQEngine>) async throws -> Int? {
        try await session.queryValue("INSERT INTO items (text) VALUES (\(text)) RETURNING id", as: Int.self)
    }
    public static func itemText(_ id: Int, in session: DBSession<LibPQEngine>) async throws -> String? {
        try await session.query("SELECT text FROM items WHERE id = \(id)").first?.decode(String.self)
    }
    public static func selectOne(in session: DBSession<LibPQEngine>) async throws {
        _ = try await session.queryValue("SELECT 1", as: Int.self)
    }
}
