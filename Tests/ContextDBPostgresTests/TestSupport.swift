import ContextDB
import Testing

/// Expects `body` to throw a ``DBError`` with `code`, and returns it for more checks.
@discardableResult
func expectDBError(
    _ code: DBError.Code,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async -> DBError? {
    let error = await #expect(throws: DBError.self, sourceLocation: sourceLocation) { try await body() }
    #expect(error?.code == code, "got \(String(describing: error))", sourceLocation: sourceLocation)
    return error
}
