import ContextDB
import Logging
import Vapor

/// Gives every Vapor request its own `DBContext` and ends it before the response leaves.
///
/// - A request that already runs in a context (a test installed one) passes through untouched,
///   but its route still reaches that context through `Request.dbContext`.
/// - Otherwise the middleware opens a context and calls the rest of the chain in it. When the
///   response status is below 400, every open transaction is committed — `beforeCommit` first —
///   **before** the response is returned; if a commit fails, the error goes on to Vapor's
///   `ErrorMiddleware` and the client gets a 500, never a 2xx for data that was not saved. A
///   status of 400 or more, or a thrown error (`Abort` included), rolls back.
/// - Every session is closed and its connection returned when the request ends (Vapor lets a
///   handler run to its end when the client hangs up).
/// - A `DBError` that ends the request becomes an `Abort` (`DBError.httpAnswer(exposingDetails:)`):
///   503 with `Retry-After` when the database cannot serve now (no fit host, a pool or host
///   out of reach, writes prevented, a lost connection) and the request had committed nothing,
///   409 for a write through a read-only connect's session, else 500 — with a reason that names no host.
/// - The context is also stored in the request (``Vapor/Request/dbContext``), for routes that
///   return an `EventLoopFuture` and middleware that calls on through one: a task-local does
///   not follow a future's callbacks.
///
/// Add it after Vapor's `ErrorMiddleware` (which `Application` installs first by default), so
/// that it sees errors before they become responses:
///
/// ```swift
/// app.middleware.use(DBSessionMiddleware())
/// app.post("items") { request async throws -> HTTPStatus in
///     try await primary.session().execute("INSERT INTO items (text) VALUES ('a')")
///     return .created
/// }
/// ```
///
/// > Warning: The commit happens before the response body is written. A streamed body must not
/// > use the session: by the time it runs, the session is closed.
public struct DBSessionMiddleware: AsyncMiddleware {
    /// Runs before each commit with the session about to commit; a throw prevents the commit.
    public typealias BeforeCommit = @Sendable (any AnyDBSession) async throws -> Void
    /// Runs after the request's transactions committed, to adjust the response from the
    /// context's stored values (a cookie, a header).
    public typealias OnCommitted = @Sendable (DBContext, Response) -> Void

    let beforeCommit: BeforeCommit?
    let onCommitted: OnCommitted?
    let tokenName: String?
    let exposesErrorDetails: Bool

    /// Creates the middleware.
    /// - Parameters:
    ///   - beforeCommit: Runs before each commit; `DBContext.current` is the request's context.
    ///   - onCommitted: Runs after a successful commit with the context and the response.
    ///   - consistencyTokenName: The name of the cookie and header that carry the
    ///     read-your-own-writes position (`DBContext.consistencyToken`) between requests.
    ///     Default `"X-WAL-LSN"`: a position sent back in that cookie or header (the header
    ///     wins) routes the request's replica reads to a replica that has it; a request whose
    ///     commit advanced it answers with the cookie (`Path=/; SameSite=Lax`) and the header.
    ///     `nil` turns this off.
    ///   - exposesErrorDetails: Put a `DBError`'s description (connect, host, the server's
    ///     reason; never a password) in the error's `reason`. Default `false`: the public
    ///     learns only what kind of failure it was.
    public init(
        beforeCommit: BeforeCommit? = nil,
        onCommitted: OnCommitted? = nil,
        consistencyTokenName: String? = "X-WAL-LSN",
        exposesErrorDetails: Bool = false
    ) {
        self.beforeCommit = beforeCommit
        self.onCommitted = onCommitted
        self.tokenName = consistencyTokenName
        self.exposesErrorDetails = exposesErrorDetails
    }

    public func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        let incoming = incomingToken(request)
        do {
            return try await withDBRequest(
                ifActive: .join,
                consistencyToken: incoming,
                beforeCommit: beforeCommit,
                statusCode: { Int($0.status.code) },
                onCommitted: { context, response in
                    if let tokenName, let token = context.consistencyToken, token != incoming {
                        response.cookies[tokenName] = HTTPCookies.Value(string: token, path: "/", isHTTPOnly: false, sameSite: .lax)
                        response.headers.replaceOrAdd(name: tokenName, value: token)
                    }
                    onCommitted?(context, response)
                }
            ) {
                let outer = request.storage[RequestDBContextKey.self]
                request.storage[RequestDBContextKey.self] = DBContext.current
                defer { request.storage[RequestDBContextKey.self] = outer }
                return try await next.respond(to: request)
            }
        } catch let error as DBError {
            if error.code == .commitFailed || error.code == .commitOutcomeUnknown {
                // Logged here, where the request's logger is: the client only sees a 500. The
                // message (which may quote the server, and so a value) only at debug level.
                request.logger.warning("the request's transaction did not commit", metadata: [
                    "db.connect": "\(error.connect ?? "")", "db.host": "\(error.host ?? "")", "error.type": "\(error.code)",
                ])
                request.logger.debug("why the transaction did not commit", metadata: ["error.message": "\(error.message)"])
            }
            let answer = error.httpAnswer(exposingDetails: exposesErrorDetails)
            var headers = HTTPHeaders()
            if let retryAfter = answer.retryAfter { headers.replaceOrAdd(name: .retryAfter, value: "\(retryAfter)") }
            throw Abort(HTTPResponseStatus(statusCode: answer.status), headers: headers, reason: answer.message)
        }
    }

    /// The token the client sent back: the header wins over the cookie. Oversized or
    /// non-printable values are ignored (the engine validates the rest).
    private func incomingToken(_ request: Request) -> String? {
        guard let tokenName else { return nil }
        return DBContext.consistencyToken(fromClient: request.headers.first(name: tokenName) ?? request.cookies[tokenName]?.string)
    }
}

/// Where a request keeps its context.
enum RequestDBContextKey: StorageKey {
    typealias Value = DBContext
}
