import ContextDB
import Foundation

/// A statement for a libpq session: interpolated values become bound parameters (`$1`, `$2`…)
/// sent in PostgreSQL's text format, never spliced into the SQL.
///
/// ```swift
/// let rows = try await session.query("SELECT id, text FROM items WHERE id = \(id)")
/// ```
public struct LibPQQuery: Sendable, ExpressibleByStringInterpolation {
    /// The SQL, with `$1`, `$2`… in place of the values.
    public var sql: String
    /// The values, in text format; `nil` for NULL.
    public var parameters: [String?]

    /// A statement without parameters.
    public init(stringLiteral value: String) {
        sql = value
        parameters = []
    }

    /// A statement with the interpolated values as parameters.
    public init(stringInterpolation: StringInterpolation) {
        sql = stringInterpolation.sql
        parameters = stringInterpolation.parameters
    }

    /// Builds the SQL and its parameters.
    public struct StringInterpolation: StringInterpolationProtocol {
        var sql = ""
        var parameters: [String?] = []

        /// Reserves room for the SQL.
        public init(literalCapacity: Int, interpolationCount: Int) {
            sql.reserveCapacity(literalCapacity + 3 * interpolationCount)
        }

        /// SQL text, as written.
        public mutating func appendLiteral(_ literal: String) { sql += literal }

        /// A bound parameter.
        public mutating func appendInterpolation(_ value: some LibPQEncodable) {
            parameters.append(value.libpqText)
            sql += "$\(parameters.count)"
        }

        /// SQL spliced as is — for identifiers your code chooses, never for input.
        public mutating func appendInterpolation(unescaped text: String) { sql += text }
    }
}

/// A value sent as a parameter in PostgreSQL's text format.
public protocol LibPQEncodable: Sendable {
    /// The value as PostgreSQL reads it in text format; `nil` for NULL.
    var libpqText: String? { get }
}

/// A value read from a column in PostgreSQL's text format.
public protocol LibPQDecodable: Sendable {
    /// Reads the value, or `nil` when the text is not one (the row's decode then throws).
    /// - Parameter text: The column's text; `nil` for NULL.
    static func libpqDecode(_ text: String?) -> Self??
}

extension LibPQEncodable where Self: LosslessStringConvertible {
    /// The value's `description`.
    public var libpqText: String? { description }
}

extension LibPQDecodable where Self: LosslessStringConvertible {
    /// The value `init?(_:)` reads from the text.
    public static func libpqDecode(_ text: String?) -> Self?? { text.map { Self($0) } ?? .some(nil) }
}

extension String: LibPQEncodable, LibPQDecodable {}
extension Int: LibPQEncodable, LibPQDecodable {}
extension Int32: LibPQEncodable, LibPQDecodable {}
extension Int64: LibPQEncodable, LibPQDecodable {}
extension Double: LibPQEncodable, LibPQDecodable {}

extension Bool: LibPQEncodable, LibPQDecodable {
    /// `t` or `f`.
    public var libpqText: String? { self ? "t" : "f" }
    /// `t`/`true` or `f`/`false`.
    public static func libpqDecode(_ text: String?) -> Bool?? {
        switch text {
        case "t", "true": return true
        case "f", "false": return false
        default: return nil
        }
    }
}

extension UUID: LibPQEncodable, LibPQDecodable {
    /// The UUID's lower-case text.
    public var libpqText: String? { uuidString.lowercased() }
    /// A UUID's text.
    public static func libpqDecode(_ text: String?) -> UUID?? { text.map { UUID(uuidString: $0) } ?? .some(nil) }
}

extension Optional: LibPQEncodable where Wrapped: LibPQEncodable {
    /// NULL for `nil`.
    public var libpqText: String? { self?.libpqText ?? nil }
}

extension Optional: LibPQDecodable where Wrapped: LibPQDecodable {
    /// `nil` for NULL.
    public static func libpqDecode(_ text: String?) -> Wrapped??? {
        guard let text else { return .some(.some(nil)) }
        return Wrapped.libpqDecode(text).map { $0.map { .some($0) } }
    }
}

/// One row of a libpq query: its columns' names and text values.
public struct LibPQRow: Sendable {
    /// The columns' names, in order.
    public let columns: [String]
    /// The columns' values in text format; `nil` for NULL.
    public let values: [String?]

    /// The value of column `index` (from 0) as `type`.
    /// - Throws: `DBError.Code.queryFailed` naming the column when it is NULL (for a
    ///   non-optional type), missing, or not a `type`.
    public func decode<T: LibPQDecodable>(_ type: T.Type = T.self, column index: Int = 0) throws -> T {
        guard values.indices.contains(index) else {
            throw DBError(.queryFailed, "the row has \(values.count) column(s); there is no column \(index)")
        }
        guard let decoded = T.libpqDecode(values[index]), let value = decoded else {
            let shown = values[index].map { "\"\($0.prefix(40))\"" } ?? "NULL"
            throw DBError(.queryFailed, "column \(index) (\(columns[index])) is \(shown), not a \(T.self)")
        }
        return value
    }

    /// The value of the column named `name` as `type`.
    /// - Throws: `DBError.Code.queryFailed` when there is no such column or it is not a `type`.
    public func decode<T: LibPQDecodable>(_ type: T.Type = T.self, column name: String) throws -> T {
        guard let index = columns.firstIndex(of: name) else {
            throw DBError(.queryFailed, "the row has no column \"\(name)\" (it has \(columns.joined(separator: ", ")))")
        }
        return try decode(type, column: index)
    }

    /// The first columns as a tuple: `try row.decode((Int, String).self)`.
    public func decode<each T: LibPQDecodable>(_ types: (repeat each T).Type) throws -> (repeat each T) {
        var index = 0
        func next<U: LibPQDecodable>(_: U.Type) throws -> U {
            defer { index += 1 }
            return try decode(U.self, column: index)
        }
        return (repeat try next((each T).self))
    }
}
