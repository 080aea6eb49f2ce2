import ContextDB
import Synchronization
import Testing
import TestSupport

/// Serves one "request" the way DBSessionMiddleware does (see `withDBRequest`); a thrown error
/// or a failed commit becomes a 500. Returns the status sent.
func serve(_ handler: () async throws -> Int) async -> Int {
    do {
        return try await withDBRequest(statusCode: { $0 }, handler)
    } catch {
        return 500
    }
}
