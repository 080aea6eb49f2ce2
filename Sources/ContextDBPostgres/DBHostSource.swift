import ContextDB
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a ``PostgresTopology`` gets its hosts: the URI's list, a DNS name resolved again every
/// interval, or a closure of your own.
///
/// With a source that changes, hosts that appear are probed and routed to once a probe has
/// seen them; a host missing from two lookups in a row is dropped from the snapshot (no new
/// session goes there) and each connect drains its engine for it — at most
/// ``PostgresEngine/drainTimeout`` — the next time it creates a session.
///
/// ```swift
/// // A Kubernetes headless service: one name, an address per pod, looked up every 10 s.
/// let topology = try PostgresTopology(
///     url: "postgresql://app:secret@db-headless.app.svc:5432/app",
///     hosts: .dns(every: .seconds(10))
/// )
/// ```
public struct DBHostSource: Sendable {
    /// Looks up a host name's addresses: IPv4 or IPv6 literals, in the order to try them.
    public typealias Resolver = @Sendable (_ name: String) async throws -> [String]

    enum Kind: Sendable {
        /// These hosts (`nil`: the URI's), for good.
        case fixed([PostgresEndpoint]?)
        /// Hosts looked up every `interval`.
        case changing(interval: Duration, lookUp: @Sendable (_ url: PostgresURL) async throws -> [PostgresEndpoint])
    }

    let kind: Kind

    /// The URI's hosts, fixed. The default.
    public static var url: DBHostSource { DBHostSource(kind: .fixed(nil)) }

    /// A fixed list of hosts, instead of the URI's (its credentials and settings still apply).
    /// - Parameter endpoints: The servers.
    public static func fixed(_ endpoints: [PostgresEndpoint]) -> DBHostSource { DBHostSource(kind: .fixed(endpoints)) }

    /// Each host name of the URI resolved to its addresses, looked up again every `interval`:
    /// a name with several addresses (a Kubernetes headless service, a cloud reader endpoint)
    /// becomes one host per address, on the URI's port for that name. Literal addresses are
    /// kept as they are.
    ///
    /// The hosts are addresses, so with `sslmode=verify-full` the server's certificate must
    /// name the address (an IP subject alternative name); otherwise use `verify-ca`.
    /// A lookup that fails or finds nothing keeps the previous hosts (and is logged), so a
    /// resolver outage does not empty the cluster.
    /// - Parameters:
    ///   - interval: The time between two lookups. Default 30 s.
    ///   - resolver: How names are looked up. Default ``systemResolver``.
    public static func dns(every interval: Duration = .seconds(30), resolver: @escaping Resolver = systemResolver) -> DBHostSource {
        DBHostSource(kind: .changing(interval: interval) { url in
            var endpoints: [PostgresEndpoint] = []
            for endpoint in url.endpoints {
                let addresses = PostgresEndpoint.isAddressLiteral(endpoint.host) ? [endpoint.host] : try await resolver(endpoint.host)
                for address in addresses {
                    let resolved = PostgresEndpoint(host: address, port: endpoint.port)
                    if !endpoints.contains(resolved) { endpoints.append(resolved) }
                }
            }
            return endpoints
        })
    }

    /// Hosts from your own code — Patroni's REST API, Consul, a configuration service — asked
    /// again every `interval`. An error or an empty list keeps the previous hosts (and is
    /// logged).
    /// - Parameters:
    ///   - interval: The time between two calls.
    ///   - hosts: Returns the cluster's servers now.
    public static func custom(
        every interval: Duration, _ hosts: @escaping @Sendable () async throws -> [PostgresEndpoint]
    ) -> DBHostSource {
        DBHostSource(kind: .changing(interval: interval) { _ in try await hosts() })
    }

    /// The system's resolver (`getaddrinfo`, as `/etc/hosts` and `/etc/resolv.conf` say), run on
    /// a dispatch thread so no task of Swift's cooperative pool blocks on it. It returns the
    /// name's IPv4 addresses, or its IPv6 addresses when it has none: a server listening on both
    /// families is one host, not two. A cancelled lookup returns at once (the thread finishes
    /// the lookup and drops it).
    /// - Throws: `DBError.Code.connectionFailed` naming the host when the lookup fails;
    ///   `CancellationError` when the task is cancelled.
    public static let systemResolver: Resolver = { name in
        let continuation = Mutex<CheckedContinuation<[String], any Error>?>(nil)
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { resume in
                continuation.withLock { $0 = resume }
                if Task.isCancelled { continuation.withLock { $0.take() }?.resume(throwing: CancellationError()) }
                DispatchQueue.global().async {
                    let result = Result { try getAddresses(name) }
                    continuation.withLock { $0.take() }?.resume(with: result)
                }
            }
        } onCancel: {
            continuation.withLock { $0.take() }?.resume(throwing: CancellationError())
        }
    }

    private static func getAddresses(_ name: String) throws -> [String] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(name, nil, &hints, &list)
        guard status == 0, let list else {
            throw DBError(.connectionFailed, "could not resolve \(name): \(String(cString: gai_strerror(status)))", host: name)
        }
        defer { freeaddrinfo(list) }
        var v4: [String] = []
        var v6: [String] = []
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            if getnameinfo(current.pointee.ai_addr, current.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST) == 0 {
                let address = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if current.pointee.ai_family == AF_INET6 {
                    if !v6.contains(address) { v6.append(address) }
                } else if !v4.contains(address) {
                    v4.append(address)
                }
            }
            entry = current.pointee.ai_next
        }
        return v4.isEmpty ? v6 : v4
    }
}
