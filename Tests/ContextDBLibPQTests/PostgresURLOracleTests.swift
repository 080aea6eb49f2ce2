import CLibPQ
import ContextDB
import ContextDBLibPQ
import ContextDBPostgres
import Testing

/// libpq as an oracle for `PostgresURL`: each URI of a corpus goes to both parsers, which must
/// agree on hosts, ports, user, password, database and parameters — or both reject it, or
/// differ only in a documented way (ContextDB checks values when the URI is parsed; libpq when
/// it connects).
@Suite struct PostgresURLOracleTests {
    enum Expectation: Sendable {
        /// Both parse it, to the same thing.
        case agree
        /// Both reject it.
        case bothReject
        /// libpq parses it and checks the value at connect; ContextDB rejects it at once.
        case contextDBRejectsAtParse
        /// A parameter newer than this libpq (`load_balance_hosts`: libpq 16).
        case newerThanLibPQ(version: Int32)
    }

    static let corpus: [(String, Expectation)] = [
        ("postgresql://app:secret@db1:5433,db2:5434/shop?sslmode=disable", .agree),
        ("postgres://app@db1,db2/shop", .agree),
        ("postgresql://app@db1:5433,db2/shop", .agree),
        ("postgresql://app:secret@[::1]:5432,[fe80::1]/shop?sslmode=disable", .agree),
        ("postgresql://app%40corp:p%3Aw%2Fd@db1/my%20db?application_name=my%20app", .agree),
        ("postgresql://app:secret@db1/shop?connect_timeout=5&options=-c%20search_path%3Dapp&target_session_attrs=read-write", .agree),
        ("postgresql://app@db1/shop?target_session_attrs=prefer-standby&keepalives=1&keepalives_idle=30&keepalives_interval=5&keepalives_count=3", .agree),
        ("postgresql://app@db1/shop?sslmode=verify-full&application_name=", .agree),
        ("postgresql://app:@db1/shop", .agree),
        ("postgresql://app@db1/", .agree),
        ("postgresql://app@db1", .agree),
        ("postgresql://app@db1/shop?nosuchparameter=1", .bothReject),
        ("postgresql://app@db1/shop?sslmode", .bothReject),
        ("mysql://app@db1/shop", .bothReject),
        ("postgresql://app@db1/shop?sslmode=sometimes", .contextDBRejectsAtParse),
        ("postgresql://app@db1:port/shop", .contextDBRejectsAtParse),
        ("postgresql://app@db1/shop?connect_timeout=soon", .contextDBRejectsAtParse),
        ("postgresql://app@db1/shop?target_session_attrs=replica", .contextDBRejectsAtParse),
        ("postgresql://app@db1,db2/shop?load_balance_hosts=random", .newerThanLibPQ(version: 160000)),
    ]

    @Test(arguments: corpus.indices)
    func bothParsersAgree(index: Int) throws {
        let (uri, expectation) = Self.corpus[index]
        let ours = Result { try PostgresURL(uri) }
        let theirs = Result { try LibPQConninfo(uri) }
        switch expectation {
        case .bothReject:
            #expect(throws: DBError.self, "ContextDB rejects \(uri)") { try ours.get() }
            #expect(throws: DBError.self, "libpq rejects \(uri)") { try theirs.get() }
        case .contextDBRejectsAtParse:
            #expect(throws: DBError.self, "ContextDB rejects \(uri) at once") { try ours.get() }
            #expect(throws: Never.self, "libpq parses \(uri), to check it at connect") { try theirs.get() }
        case .newerThanLibPQ(let version) where PQlibVersion() < version:
            #expect(throws: Never.self) { try ours.get() }
            #expect(throws: DBError.self, "libpq \(PQlibVersion()) does not know it yet") { try theirs.get() }
        case .agree, .newerThanLibPQ:
            let url = try ours.get()
            let libpq = try theirs.get().parameters
            Self.expectSame(url, libpq, uri)
        }
    }

    static func expectSame(_ url: PostgresURL, _ libpq: [String: String], _ uri: String) {
        let hosts = libpq["host"].map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) } ?? []
        #expect(url.endpoints.map(\.host) == hosts, "hosts of \(uri)")
        // libpq: one port for every host, or one per host; none is 5432.
        let ports = libpq["port"].map { $0.split(separator: ",", omittingEmptySubsequences: false).map { Int($0) ?? 5432 } } ?? []
        let expectedPorts = ports.count == 1 ? Array(repeating: ports[0], count: hosts.count)
            : ports.isEmpty ? Array(repeating: 5432, count: hosts.count) : ports
        #expect(url.endpoints.map(\.port) == expectedPorts, "ports of \(uri)")
        #expect(url.username == libpq["user"] ?? url.username, "user of \(uri)")
        #expect(url.password == libpq["password"].flatMap { $0.isEmpty ? nil : $0 } ?? url.password, "password of \(uri)")
        #expect(url.database == libpq["dbname"].flatMap { $0.isEmpty ? nil : $0 }, "database of \(uri)")
        #expect(url.applicationName == libpq["application_name"], "application_name of \(uri)")
        #expect(url.serverOptions == libpq["options"], "options of \(uri)")
        #expect(url.sslMode.rawValue == libpq["sslmode"] ?? "prefer", "sslmode of \(uri)")
        #expect(url.targetSessionAttrs.rawValue == libpq["target_session_attrs"] ?? "any", "target_session_attrs of \(uri)")
        #expect(url.connectTimeout == .seconds(Int(libpq["connect_timeout"] ?? "10") ?? -1), "connect_timeout of \(uri)")
        #expect(url.keepalive?.isEnabled == libpq["keepalives"].map { $0 != "0" } ?? url.keepalive?.isEnabled, "keepalives of \(uri)")
        #expect(url.keepalive?.idle == libpq["keepalives_idle"].map { .seconds(Int($0)!) }, "keepalives_idle of \(uri)")
        #expect(url.keepalive?.count == libpq["keepalives_count"].map { Int($0)! }, "keepalives_count of \(uri)")
    }
}
