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
    /// The string as given.
    public let string: String
    /// The keywords the string sets (PostgreSQL docs, "Parameter Key Words"), with their values.
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
                "libpq rejected the connection string: \(reason.trimmingCharacters(in: .whitespacesAndNewlines))"
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
            .map { "\($0.key)=\($0.key == "password" ? "***" : $0.value)" }
            .joined(separator: " ")
    }
}
