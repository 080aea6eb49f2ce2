import ContextDB
import Foundation
import NIOSSL
import PostgresNIO

/// A libpq-style connection URI: `postgresql://user:password@host1:5432,host2:5433/db?sslmode=disable`.
///
/// Several hosts are allowed; which one serves a session is the connect's choice. Recognised
/// query parameters, with libpq's meanings (PostgreSQL docs, "Parameter Key Words" and
/// "SSL Support"): `sslmode` (`disable`, `allow`, `prefer` — the default —, `require`,
/// `verify-ca`, `verify-full`), `sslrootcert` (a PEM file of trusted CAs, or `system`),
/// `sslcert` and `sslkey` (a client certificate and its key, PEM), `application_name`,
/// `connect_timeout` (seconds), `options` (`-c name=value` settings sent at connect),
/// `target_session_attrs` and `load_balance_hosts=random` (which `DBConnect(url:)` routes by),
/// `keepalives`, `keepalives_idle`, `keepalives_interval` and `keepalives_count` (see
/// ``PostgresKeepalive``).
/// Others are rejected, so a typo never goes unnoticed.
///
/// The ``description`` masks the password.
public struct PostgresURL: Sendable, CustomStringConvertible {
    /// The servers named in the URI, in order.
    public var endpoints: [PostgresEndpoint]
    /// The user name.
    public var username: String
    /// The password, if any. Never printed.
    public var password: String?
    /// The database name; `nil` means the server's default (the user name).
    public var database: String?
    /// The `sslmode` parameter. Default ``PostgresSSLMode/prefer``.
    public var sslMode: PostgresSSLMode
    /// The `application_name` parameter, shown in `pg_stat_activity`.
    public var applicationName: String?
    /// The `connect_timeout` parameter. Default 10 seconds.
    public var connectTimeout: Duration
    /// The `sslrootcert` parameter: the path of a PEM file with the CAs that may sign the
    /// server's certificate (instead of the system's), or `system` for the system's CAs.
    ///
    /// As in libpq, a file makes `sslmode=require` check the chain as `verify-ca` does, and
    /// `system` requires `sslmode=verify-full` (its default then). `nil`: the system's CAs for
    /// `verify-ca` and `verify-full`.
    public var sslRootCert: String?
    /// The `sslcert` parameter: the path of the client's certificate (PEM, read when the URI is
    /// parsed), for servers that authenticate clients by certificate (`pg_hba.conf` method
    /// `cert`). Given with ``sslKey``.
    public var sslCert: String?
    /// The `sslkey` parameter: the path of the client certificate's private key (PEM, not
    /// encrypted, read when the URI is parsed). Given with ``sslCert``.
    public var sslKey: String?
    /// The `options` parameter: command-line options sent to the server at each connect, such as
    /// `-c statement_timeout=5s -c search_path=app` (PostgreSQL docs, "Parameter Key Words").
    public var serverOptions: String?
    /// The `target_session_attrs` parameter: which host of the URI a session may use. Default
    /// ``PostgresTargetSessionAttrs/any``.
    public var targetSessionAttrs: PostgresTargetSessionAttrs
    /// `load_balance_hosts=random`: spread sessions over the hosts in random order instead of
    /// trying them in the URI's order. Default `false` (`disable`).
    public var loadBalanceHosts: Bool
    /// `keepalives`, `keepalives_idle`, `keepalives_interval` and `keepalives_count`: TCP
    /// keepalive settings for every pooled connection's socket; `nil` when the URI gives none.
    public var keepalive: PostgresKeepalive?

    /// Parses a URI.
    /// - Parameter string: A `postgresql://` or `postgres://` URI.
    /// - Throws: `DBError.Code.invalidConfiguration` naming the problem (never echoing the password),
    ///   or `DBError.Code.emptyHost`.
    public init(_ string: String) throws {
        func invalid(_ problem: String) -> DBError {
            DBError(
                .invalidConfiguration,
                "malformed PostgreSQL URI: \(problem); expected postgresql://user:password@host:port[,host:port…]/database[?sslmode=…]"
            )
        }
        var rest = Substring(string)
        if rest.hasPrefix("postgresql://") {
            rest = rest.dropFirst("postgresql://".count)
        } else if rest.hasPrefix("postgres://") {
            rest = rest.dropFirst("postgres://".count)
        } else {
            throw invalid("it must start with postgresql:// or postgres://")
        }

        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        // The user info ends at the last "@": a password may contain "@" only percent-encoded,
        // but be lenient with the host list, which never contains one.
        var userInfo: Substring?
        if let at = rest.lastIndex(of: "@") {
            userInfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
        }

        var username = ""
        var password: String?
        if let userInfo {
            let parts = userInfo.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard let user = parts[0].removingPercentEncoding else { throw invalid("the user name has a bad %-escape") }
            username = user
            if parts.count == 2 {
                guard let decoded = parts[1].removingPercentEncoding else {
                    throw invalid("the password has a bad %-escape")
                }
                password = decoded
            }
        }
        guard !username.isEmpty else { throw invalid("it names no user (user@host)") }

        guard !rest.isEmpty else {
            throw DBError(.emptyHost, "the PostgreSQL URI names no host; write postgresql://user@host:5432/database")
        }
        endpoints = try rest.split(separator: ",", omittingEmptySubsequences: false).map {
            try PostgresEndpoint(parsing: String($0))
        }

        self.username = username
        self.password = password
        guard let database = path.removingPercentEncoding else { throw invalid("the database name has a bad %-escape") }
        self.database = database.isEmpty ? nil : database
        self.sslMode = .prefer
        self.applicationName = nil
        self.connectTimeout = .seconds(10)
        self.targetSessionAttrs = .any
        self.loadBalanceHosts = false
        var explicitSSLMode: PostgresSSLMode?

        for pair in query.split(separator: "&") where !pair.isEmpty {
            let keyValue = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(keyValue[0])
            guard keyValue.count == 2, let value = keyValue[1].removingPercentEncoding else {
                throw invalid("the parameter \"\(key)\" has no value")
            }
            switch key {
            case "sslmode":
                guard let mode = PostgresSSLMode(rawValue: value) else {
                    throw invalid("sslmode \"\(value)\" is not one of \(PostgresSSLMode.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                explicitSSLMode = mode
            case "sslrootcert":
                guard value == "system" || FileManager.default.isReadableFile(atPath: value) else {
                    throw invalid("sslrootcert \"\(value)\" is not a readable file (a PEM file of CA certificates, or system)")
                }
                sslRootCert = value
            case "sslcert":
                guard (try? NIOSSLCertificate.fromPEMFile(value))?.isEmpty == false else {
                    throw invalid("sslcert \"\(value)\" is not a readable PEM file of certificates")
                }
                sslCert = value
            case "sslkey":
                guard (try? NIOSSLPrivateKey(file: value, format: .pem)) != nil else {
                    throw invalid("sslkey \"\(value)\" is not a readable PEM private key (not encrypted)")
                }
                sslKey = value
            case "options":
                serverOptions = value
            case "target_session_attrs":
                guard let attrs = PostgresTargetSessionAttrs(rawValue: value) else {
                    throw invalid(
                        "target_session_attrs \"\(value)\" is not one of \(PostgresTargetSessionAttrs.allCases.map(\.rawValue).joined(separator: ", "))"
                    )
                }
                targetSessionAttrs = attrs
            case "load_balance_hosts":
                guard value == "random" || value == "disable" else {
                    throw invalid("load_balance_hosts \"\(value)\" is not random or disable")
                }
                loadBalanceHosts = value == "random"
            case "application_name":
                applicationName = value
            case "keepalives":
                guard let flag = Int(value) else { throw invalid("keepalives \"\(value)\" is not 1 (on) or 0 (off)") }
                keepalive = keepalive ?? PostgresKeepalive()
                keepalive!.isEnabled = flag != 0
            case "keepalives_idle", "keepalives_interval":
                guard let seconds = Int(value), (0...PostgresKeepalive.maximumSeconds).contains(seconds) else {
                    throw invalid(
                        "\(key) \"\(value)\" is not a number of seconds from 1 to \(PostgresKeepalive.maximumSeconds) (0 for the system's default)"
                    )
                }
                keepalive = keepalive ?? PostgresKeepalive()
                let duration: Duration? = seconds == 0 ? nil : .seconds(seconds)
                if key == "keepalives_idle" { keepalive!.idle = duration } else { keepalive!.interval = duration }
            case "keepalives_count":
                guard let count = Int(value), (0...PostgresKeepalive.maximumCount).contains(count) else {
                    throw invalid(
                        "keepalives_count \"\(value)\" is not a number of probes from 1 to \(PostgresKeepalive.maximumCount) (0 for the system's default)"
                    )
                }
                keepalive = keepalive ?? PostgresKeepalive()
                keepalive!.count = count == 0 ? nil : count
            case "connect_timeout":
                guard let seconds = Int(value), seconds > 0 else {
                    throw invalid("connect_timeout \"\(value)\" is not a positive number of seconds")
                }
                connectTimeout = .seconds(seconds)
            default:
                throw invalid(
                    "the parameter \"\(key)\" is not supported (supported: sslmode, sslrootcert, sslcert, sslkey, application_name, "
                        + "connect_timeout, options, target_session_attrs, load_balance_hosts, keepalives, keepalives_idle, "
                        + "keepalives_interval, keepalives_count)"
                )
            }
        }
        if sslRootCert == "system" {
            // libpq 16: `sslrootcert=system` defaults to, and only allows, verify-full.
            if let explicitSSLMode, explicitSSLMode != .verifyFull {
                throw invalid("sslrootcert=system requires sslmode=verify-full (as in libpq), not \(explicitSSLMode.rawValue)")
            }
            sslMode = .verifyFull
        } else if let explicitSSLMode {
            sslMode = explicitSSLMode
        }
        guard (sslCert == nil) == (sslKey == nil) else {
            throw invalid("sslcert and sslkey go together: name the client certificate and its key")
        }
    }

    /// The URI with the password masked.
    public var description: String {
        var text = "postgresql://\(username)"
        if password != nil { text += ":***" }
        text += "@" + endpoints.map(\.description).joined(separator: ",")
        if let database { text += "/\(database)" }
        text += "?sslmode=\(sslMode.rawValue)"
        if let sslRootCert { text += "&sslrootcert=\(sslRootCert)" }
        if let sslCert { text += "&sslcert=\(sslCert)" }
        if let sslKey { text += "&sslkey=\(sslKey)" }
        if targetSessionAttrs != .any { text += "&target_session_attrs=\(targetSessionAttrs.rawValue)" }
        if loadBalanceHosts { text += "&load_balance_hosts=random" }
        return text
    }

    /// The TLS setting `sslmode` asks for.
    public var tls: PostgresClient.Configuration.TLS {
        switch sslMode {
        case .disable: return .disable
        case .require, .verifyCA, .verifyFull: return .require(tlsConfiguration)
        case .allow, .prefer: return .prefer(tlsConfiguration)
        }
    }

    /// The certificate checks `sslmode` asks for: none below `verify-ca` (but the chain for
    /// `require` with an `sslrootcert` file, as in libpq), the chain for `verify-ca`, the chain
    /// and the host name for `verify-full`; the trusted CAs of `sslrootcert`, and the client
    /// certificate of `sslcert` and `sslkey`.
    var tlsConfiguration: TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        let rootFile = sslRootCert.flatMap { $0 == "system" ? nil : $0 }
        switch sslMode {
        case .verifyFull: break
        case .verifyCA: configuration.certificateVerification = .noHostnameVerification
        case .require where rootFile != nil: configuration.certificateVerification = .noHostnameVerification
        case .disable, .allow, .prefer, .require: configuration.certificateVerification = .none
        }
        if let rootFile { configuration.trustRoots = .file(rootFile) }
        // Checked when the URI was parsed; a file broken since then sends no client certificate,
        // and the server says that it wants one.
        if let sslCert, let sslKey, let chain = try? NIOSSLCertificate.fromPEMFile(sslCert),
           let key = try? NIOSSLPrivateKey(file: sslKey, format: .pem) {
            configuration.certificateChain = chain.map { .certificate($0) }
            configuration.privateKey = .privateKey(key)
        }
        return configuration
    }

    /// The PostgresNIO configuration for one of the endpoints.
    /// - Parameter endpoint: The server; default the first one.
    /// - Returns: A client configuration with this URI's user, database, TLS and timeouts.
    public func configuration(for endpoint: PostgresEndpoint? = nil) -> PostgresClient.Configuration {
        let endpoint = endpoint ?? endpoints[0]
        var configuration = PostgresClient.Configuration(
            host: endpoint.host, port: endpoint.port,
            username: username, password: password, database: database, tls: tls
        )
        configuration.options.connectTimeout = connectTimeout
        configuration.options.additionalStartupParameters = startupParameters
        return configuration
    }
}

extension PostgresURL {
    /// The direct-connection configuration for one endpoint, with the same TLS rules as the pool's.
    func connectionConfiguration(for endpoint: PostgresEndpoint) throws -> PostgresConnection.Configuration {
        let tls: PostgresConnection.Configuration.TLS
        switch sslMode {
        case .disable: tls = .disable
        case .require, .verifyCA, .verifyFull: tls = .require(try NIOSSLContext(configuration: tlsConfiguration))
        case .allow, .prefer: tls = .prefer(try NIOSSLContext(configuration: tlsConfiguration))
        }
        var configuration = PostgresConnection.Configuration(
            host: endpoint.host, port: endpoint.port,
            username: username, password: password, database: database, tls: tls
        )
        configuration.options.connectTimeout = .nanoseconds(
            connectTimeout.components.seconds * 1_000_000_000 + connectTimeout.components.attoseconds / 1_000_000_000
        )
        configuration.options.additionalStartupParameters = startupParameters
        return configuration
    }

    /// `application_name` and `options`, sent in each connection's startup message.
    var startupParameters: [(String, String)] {
        [("application_name", applicationName), ("options", serverOptions)].compactMap { name, value in value.map { (name, $0) } }
    }
}

/// libpq's `target_session_attrs` (PostgreSQL docs, "Parameter Key Words"): which hosts a
/// session may use. `DBConnect(url:)` routes by it with a `PostgresTopology` of the URI's hosts.
public enum PostgresTargetSessionAttrs: String, CaseIterable, Sendable, Hashable {
    /// Any host, in the URI's order: the first is the default host. The default.
    case any
    /// A host that accepts writes: the primary.
    case readWrite = "read-write"
    /// A host in read-only mode: a standby (sessions are `READ ONLY`).
    case readOnly = "read-only"
    /// The primary.
    case primary
    /// A standby (sessions are `READ ONLY`).
    case standby
    /// A standby when one is fit, else the primary.
    case preferStandby = "prefer-standby"
}

/// PostgreSQL's `sslmode` (PostgreSQL docs, "SSL Support" in libpq): whether to use TLS and what
/// to verify.
public enum PostgresSSLMode: String, CaseIterable, Sendable, Hashable {
    /// No TLS.
    case disable
    /// TLS if the server insists; ContextDB treats it as ``prefer`` (PostgresNIO tries TLS first).
    case allow
    /// TLS when the server offers it, without certificate checks. The default.
    case prefer
    /// TLS always, without certificate checks — but with an `sslrootcert` file, the chain is
    /// checked as for ``verifyCA`` (libpq's rule).
    case require
    /// TLS always; the server's certificate chain must be trusted.
    case verifyCA = "verify-ca"
    /// TLS always; the chain must be trusted and the certificate must name the host.
    case verifyFull = "verify-full"
}
