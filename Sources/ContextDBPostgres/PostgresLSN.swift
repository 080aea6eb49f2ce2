import ContextDB

/// A PostgreSQL write-ahead-log position, as `pg_current_wal_lsn()` prints it (`"0/3024738"`).
///
/// It is the read-your-own-writes token: a replica whose replay position has reached it has
/// every write committed before it was taken.
public struct PostgresLSN: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The position as one 64-bit number.
    public var value: UInt64

    /// Creates a position from its 64-bit value.
    public init(_ value: UInt64) { self.value = value }

    /// Parses `"X/Y"` (two hexadecimal halves); `nil` for anything else, so a token a client
    /// sends back can never crash or mislead routing.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, (1...8).contains(parts[0].count), (1...8).contains(parts[1].count),
              let high = UInt64(parts[0], radix: 16), let low = UInt64(parts[1], radix: 16)
        else { return nil }
        value = high << 32 | low
    }

    public var description: String {
        String(value >> 32, radix: 16, uppercase: true) + "/" + String(value & 0xFFFF_FFFF, radix: 16, uppercase: true)
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.value < rhs.value }

    /// The bytes from `other` up to this position; 0 when `other` is ahead.
    public func bytes(since other: PostgresLSN) -> UInt64 { value > other.value ? value - other.value : 0 }
}

extension DBContext {
    /// The read-your-own-writes position of this request, parsed from `consistencyToken`.
    public var walPosition: PostgresLSN? {
        consistencyToken.flatMap(PostgresLSN.init)
    }

    /// Raises `consistencyToken` to `position` unless it is already at or past it.
    public func advanceConsistencyToken(to position: PostgresLSN) {
        updateConsistencyToken { current in
            if let current = current.flatMap(PostgresLSN.init), current >= position { return current.description }
            return position.description
        }
    }
}
