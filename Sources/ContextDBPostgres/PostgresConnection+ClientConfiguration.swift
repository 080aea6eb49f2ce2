import ContextDB
import NIOSSL
import PostgresNIO

extension PostgresConnection.Configuration {
    /// The direct-connection configuration matching a `PostgresClient.Configuration`: the same
    /// server, credentials, TLS setting and connection options.
    ///
    /// PostgresNIO 1.33.2 keeps the client configuration's TLS setting internal, so it is read by
    /// reflection (`disable`, `prefer(TLSConfiguration)` or `require(TLSConfiguration)`); a
    /// version that changed its shape gives an error instead of a guess.
    /// - Returns: The configuration, or `DBError.Code.invalidConfiguration` when the
    ///   TLS setting cannot be read or its TLS context cannot be built.
    static func converting(_ client: PostgresClient.Configuration, host: String) -> Result<Self, DBError> {
        let tls: TLS
        do {
            switch Self.tlsSetting(of: client.tls) {
            case .disable?: tls = .disable
            case .prefer(let configuration)?: tls = .prefer(try NIOSSLContext(configuration: configuration))
            case .require(let configuration)?: tls = .require(try NIOSSLContext(configuration: configuration))
            case nil:
                return .failure(DBError(
                    .invalidConfiguration,
                    "cannot read the TLS setting of this PostgresClient.Configuration (a PostgresNIO version ContextDB does not know); declare the connect with a URL instead",
                    host: host
                ))
            }
        } catch {
            return .failure(DBError(.invalidConfiguration, "could not set up TLS", host: host, underlying: error))
        }
        var configuration: Self
        if let path = client.unixSocketPath {
            configuration = Self(unixSocketPath: path, username: client.username, password: client.password, database: client.database)
        } else {
            configuration = Self(
                host: client.host ?? "localhost", port: client.port ?? 5432,
                username: client.username, password: client.password, database: client.database, tls: tls
            )
        }
        configuration.options.connectTimeout = TimeAmount(client.options.connectTimeout)
        configuration.options.tlsServerName = client.options.tlsServerName
        configuration.options.requireBackendKeyData = client.options.requireBackendKeyData
        configuration.options.additionalStartupParameters = client.options.additionalStartupParameters
        return .success(configuration)
    }

    /// The TLS setting inside a client configuration's opaque `TLS` value.
    enum ClientTLS {
        case disable
        case prefer(TLSConfiguration)
        case require(TLSConfiguration)
    }

    static func tlsSetting(of tls: PostgresClient.Configuration.TLS) -> ClientTLS? {
        guard let base = Mirror(reflecting: tls).descendant("base") else { return nil }
        guard let (label, value) = Mirror(reflecting: base).children.first.map({ ($0.label, $0.value) }) else {
            return String(describing: base) == "disable" ? .disable : nil
        }
        guard let configuration = value as? TLSConfiguration else { return nil }
        switch label {
        case "prefer": return .prefer(configuration)
        case "require": return .require(configuration)
        default: return nil
        }
    }
}
