import CLibPQ
import ContextDB
import Foundation

/// A libpq connection string as libpq itself reads it (`PQconninfoParse`): a URI
/// (`postgresql://app@db1,db2/app?target_session_attrs=read-write`) or `key=value` pairs
/// (`host=db1 port=5432 dbname=app service=prod`).
///
/// Only what the string says is here: the `PG*` environment variables, the password file and
/// the service file are applied when a connection is opened, as libpq applies them.
/// The ``description`` masks the password.
public struct LibPQConninfo: Sendable, CustomStringConvertible {
    /// The string as given — with its password, if it has one: never log it (``description``
    /// masks it).
    public let string: String
    /// The keywords the string sets (PostgreSQL docs, "Parameter Key Words"), with their values
    /// — `password` included.
    public let parameters: [String: String]

    /// Parses a connection string with libpq.
    /// - Parameter string: A URI or a `key=value` string.
    /// - Throws: `DBError.Code.invalidConfiguration` with libpq's reason.
    public init(_ string: String) throws {
        var error: UnsafeMutablePointer<CChar>?
        guard let options = PQconninfoParse(string, &error) else {
            let reason = error.map { String(cString: $0) } ?? "out of memory"
            if let error { PQfreemem(error) }
            throw DBError(
                .invalidConfiguration,
                "libpq rejected the connection string: \(Self.redacting(reason.trimmingCharacters(in: .whitespacesAndNewlines), of: string))"
            )
        }
        defer { PQconninfoFree(options) }
        var parameters: [String: String] = [:]
        var option = options
        while let keyword = option.pointee.keyword {
            if let value = option.pointee.val { parameters[String(cString: keyword)] = String(cString: value) }
            option += 1
        }
        self.string = string
        self.parameters = parameters
    }

    /// The database name (`dbname`), if the string sets one.
    public var database: String? { parameters["dbname"] }

    /// The keywords and values, the password masked.
    public var description: String {
        parameters.sorted { $0.key < $1.key }
            .map { "\($0.key)=\(Self.secretKeywords.contains($0.key) ? "***" : $0.value)" }
            .joined(separator: " ")
    }

    static let secretKeywords: Set<String> = ["password", "sslpassword"]

    /// libpq's `message` with the string's secrets masked: some of its messages quote the whole
    /// URI, password included.
    static func redacting(_ message: String, of string: String) -> String {
        var secrets: [Substring] = []
        // A URI's `user:password@`.
        if let scheme = string.range(of: "://") {
            let rest = string[scheme.upperBound...]
            if let at = rest.lastIndex(of: "@"), let colon = rest[..<at].firstIndex(of: ":") {
                secrets.append(rest[rest.index(after: colon)..<at])
            }
        }
        // `password=…` in a URI's query or a key=value string.
        for keyword in secretKeywords {
            var search = string[...]
            while let found = search.range(of: keyword + "=") {
                let value = search[found.upperBound...].prefix { !" &'".contains($0) }
                if !value.isEmpty { secrets.append(value) }
                search = search[found.upperBound...]
            }
        }
        var redacted = message
        for secret in secrets.sorted(by: { $0.count > $1.count }) {
            redacted = redacted.replacingOccurrences(of: String(secret), with: "***")
        }
        return redacted
    }
}
