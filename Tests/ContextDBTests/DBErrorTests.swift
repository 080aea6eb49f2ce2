import ContextDB
import Testing

@Suite struct DBErrorTests {
    struct Wrapped: Error, CustomStringConvertible {
        var description: String
    }

    @Test func aCauseIsPrintedWithoutTheBuildsSourcePaths() {
        let boring = "handshakeFailed(sslError([Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:"
            + "CERTIFICATE_VERIFY_FAILED at /work/.build/checkouts/swift-nio-ssl/Sources/CNIOBoringSSL/ssl/handshake.cc:393]))"
        let error = DBError(.connectionFailed, "TLS: …", host: "db1:5432", underlying: Wrapped(description: boring))
        #expect(error.description.hasSuffix(
            "[cause: handshakeFailed(sslError([Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED]))]"
        ))
    }

    @Test(arguments: [
        ("no path here", "no path here"),
        ("found at /etc/hosts without a line", "found at /etc/hosts without a line"),
        ("a path at /tmp/x.swift: not a line", "a path at /tmp/x.swift: not a line"),
        ("two at /a/b.cc:1 and at /c/d.cc:22.", "two and."),
    ])
    func redactsOnlyPathsWithALineNumber(text: String, expected: String) {
        #expect(DBError.redactingSourcePaths(text) == expected)
    }
}

@Suite struct ClientTokenTests {
    @Test(arguments: [
        ("0/16B3748", "0/16B3748"),
        ("", nil),
        (String(repeating: "1", count: 65), nil),
        ("0/1 2", nil),
        ("0/1;Path=/", nil),
        ("0/1é", nil),
    ] as [(String, String?)])
    func aTokenFromTheClientIsTakenOnlyWhenItCanBeOne(value: String, expected: String?) {
        #expect(DBContext.consistencyToken(fromClient: value) == expected)
    }
}
