import ContextDB
import Logging
import NIOCore
import NIOPosix
import PostgresNIO
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// TCP keepalive settings, libpq's `keepalives`, `keepalives_idle`, `keepalives_interval` and
/// `keepalives_count` (PostgreSQL docs, "Parameter Key Words"): how soon the operating system
/// notices a server that vanished without closing the connection (a host powered off, a
/// network partition) while the connection is idle.
///
/// Given in the URI, they are set on every pooled connection's socket (`SO_KEEPALIVE`,
/// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`; see `man 7 tcp`). Without them the
/// connections use PostgresNIO's sockets as they come: no keepalive probes.
public struct PostgresKeepalive: Sendable, Hashable {
    /// `keepalives`: whether the socket sends keepalive probes (`1`, the default when any
    /// keepalive parameter is given) or not (`0`).
    public var isEnabled: Bool = true
    /// `keepalives_idle`: how long the connection stays idle before the first probe. `nil`
    /// (or `0` in the URI): the system's default (`net.ipv4.tcp_keepalive_time`, 2 hours on Linux).
    public var idle: Duration?
    /// `keepalives_interval`: the time between two unanswered probes. `nil`: the system's default.
    public var interval: Duration?
    /// `keepalives_count`: unanswered probes before the connection is declared dead. `nil`: the
    /// system's default.
    public var count: Int?

    /// Creates keepalive settings.
    /// - Parameters:
    ///   - isEnabled: Send keepalive probes. Default `true`.
    ///   - idle: Idle time before the first probe (whole seconds). Default: the system's.
    ///   - interval: Time between probes (whole seconds). Default: the system's.
    ///   - count: Unanswered probes before the connection is dead. Default: the system's.
    public init(isEnabled: Bool = true, idle: Duration? = nil, interval: Duration? = nil, count: Int? = nil) {
        self.isEnabled = isEnabled
        self.idle = idle
        self.interval = interval
        self.count = count
    }

    /// The largest idle time and interval Linux takes (`MAX_TCP_KEEPIDLE`): 32767 seconds.
    public static let maximumSeconds = 32_767
    /// The largest probe count Linux takes (`MAX_TCP_KEEPCNT`): 127.
    public static let maximumCount = 127

    /// The socket options, as `setsockopt` takes them: times in whole seconds from 1 to
    /// ``maximumSeconds`` and a count from 1 to ``maximumCount`` (values outside are clamped).
    var socketOptions: [(ChannelOptions.Types.SocketOption, SocketOptionValue)] {
        var options = [(ChannelOptions.Types.SocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SO_KEEPALIVE), SocketOptionValue(isEnabled ? 1 : 0))]
        guard isEnabled else { return options }
        let tcp = SocketOptionLevel(IPPROTO_TCP)
        #if canImport(Darwin)
        let idleOption = TCP_KEEPALIVE
        #else
        let idleOption = TCP_KEEPIDLE
        #endif
        func seconds(_ duration: Duration) -> SocketOptionValue {
            SocketOptionValue(min(max(duration.components.seconds, 1), Int64(Self.maximumSeconds)))
        }
        if let idle { options.append((.init(level: tcp, name: idleOption), seconds(idle))) }
        if let interval { options.append((.init(level: tcp, name: TCP_KEEPINTVL), seconds(interval))) }
        if let count { options.append((.init(level: tcp, name: TCP_KEEPCNT), SocketOptionValue(min(max(count, 1), Self.maximumCount)))) }
        return options
    }

    /// Opens a TCP connection to `endpoint` with these options set on its socket, then speaks
    /// PostgreSQL's protocol on it (TLS, startup, authentication) as `configuration` says.
    func connect(
        to endpoint: PostgresEndpoint, configuration: PostgresConnection.Configuration, id: Int, logger: Logger
    ) async throws -> PostgresConnection {
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(configuration.options.connectTimeout)
        for (option, value) in socketOptions { bootstrap = bootstrap.channelOption(option, value: value) }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: endpoint.host, port: endpoint.port).get()
        } catch {
            throw DBError(
                .connectionFailed,
                "could not reach the server: \(DBError.redactingSourcePaths(String(describing: error))); check the host, the port and that the server runs",
                host: endpoint.description, underlying: error
            )
        }
        var established = PostgresConnection.Configuration(
            establishedChannel: channel, tls: configuration.tls,
            username: configuration.username, password: configuration.password, database: configuration.database
        )
        established.options = configuration.options
        if established.options.tlsServerName == nil, !PostgresEndpoint.isAddressLiteral(endpoint.host) {
            established.options.tlsServerName = endpoint.host  // as PostgresNIO does for a host name
        }
        do {
            return try await PostgresConnection.connect(on: channel.eventLoop, configuration: established, id: id, logger: logger).get()
        } catch {
            try? await channel.close()
            throw error
        }
    }
}
