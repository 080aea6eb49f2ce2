import ContextDB
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One PostgreSQL server address: a host and a port.
///
/// Its ``description`` (`"db1:5432"`, `"[::1]:5432"`) is the host string `DBConnect` keys its
/// engines by and the `served_by` a session reports.
public struct PostgresEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// The host name or IP address, without brackets.
    public var host: String
    /// The TCP port. Default `5432`.
    public var port: Int

    /// Creates an endpoint.
    /// - Parameters:
    ///   - host: The host name or IP address.
    ///   - port: The TCP port. Default `5432`.
    public init(host: String, port: Int = 5432) {
        self.host = host
        self.port = port
    }

    /// Parses `"host"`, `"host:port"`, `"[v6]"` or `"[v6]:port"`.
    /// - Parameters:
    ///   - text: The address.
    ///   - defaultPort: The port when `text` names none.
    /// - Throws: `DBError.Code.emptyHost` or `DBError.Code.invalidConfiguration`.
    public init(parsing text: String, defaultPort: Int = 5432) throws {
        var hostPart = Substring(text)
        var portPart: Substring?
        if hostPart.hasPrefix("[") {
            guard let close = hostPart.firstIndex(of: "]") else {
                throw DBError(.invalidConfiguration, "the IPv6 address \"\(text)\" lacks its closing bracket")
            }
            let rest = hostPart[hostPart.index(after: close)...]
            hostPart = hostPart[hostPart.index(after: hostPart.startIndex)..<close]
            if rest.hasPrefix(":") { portPart = rest.dropFirst() } else if !rest.isEmpty {
                throw DBError(.invalidConfiguration, "unexpected text after the IPv6 address in \"\(text)\"")
            }
        } else if let colon = hostPart.lastIndex(of: ":") {
            portPart = hostPart[hostPart.index(after: colon)...]
            hostPart = hostPart[..<colon]
        }
        guard !hostPart.isEmpty else {
            throw DBError(.emptyHost, "the host is empty in \"\(text)\"; write it as host or host:port")
        }
        var port = defaultPort
        if let portPart {
            guard let parsed = Int(portPart), (1...65_535).contains(parsed) else {
                throw DBError(.invalidConfiguration, "the port \"\(portPart)\" of \"\(text)\" is not a number from 1 to 65535")
            }
            port = parsed
        }
        self.init(host: String(hostPart), port: port)
    }

    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Whether `host` is an IPv4 or IPv6 address rather than a name.
    static func isAddressLiteral(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}
