import ContextDB
import HTTPTypes
import Hummingbird
import Logging

/// Gives every request its own `DBContext` and ends it before the response leaves.
///
/// - A request that already runs in a context (a test installed one) passes through untouched.
/// - Otherwise the middleware opens a context and calls the rest of the chain in it. When the
///   response status is below 400, every open transaction is committed — `beforeCommit` first —
///   **before** the response is returned; if a commit fails, the client gets a 500, never a
///   2xx for data that was not saved. A status of 400 or more, or a thrown error, rolls back.
/// - Every session is closed and its connection returned, also when the request is cancelled.
/// - A `DBError` that ends the request becomes an `HTTPError` (`DBError.httpAnswer(exposingDetails:)`):
///   503 with `Retry-After` when the database cannot serve now (no fit host, a pool or host
///   out of reach, writes prevented, a lost connection) and the request had committed nothing,
///   409 for a write through a read-only connect's session, else 500 — with a message that names no host.
///
/// ```swift
/// let router = Router()
/// router.add(middleware: DBSessionMiddleware())
/// router.post("/items") { request, context in
///     try await primary.session().execute("INSERT INTO items (text) VALUES ('a')")
///     return HTTPResponse.Status.created
/// }
/// ```
///
/// > Warning: The commit happens before the response body is written. A streamed body must not
/// > use the session: by the time it runs, the session is closed.
public struct DBSessionMiddleware<Context: RequestContext>: RouterMiddleware {
    /// Runs before each commit with the session about to commit; a throw prevents the commit.
    public typealias BeforeCommit = @Sendable (any AnyDBSession) async throws -> Void
    /// Runs after the request's transactions committed, to adjust the response from the
    /// context's stored values (a cookie, a header).
    public typealias OnCommitted = @Sendable (DBContext, inout Response) -> Void

    let beforeCommit: BeforeCommit?
    let onCommitted: OnCommitted?
    let tokenName: String?
    let tokenField: HTTPField.Name?
    let exposesErrorDetails: Bool

    /// Creates the middleware.
    /// - Parameters:
    ///   - beforeCommit: Runs before each commit; `DBContext.current` is the request's context.
    ///   - onCommitted: Runs after a successful commit with the context and the response.
    ///   - consistencyTokenName: The name of the cookie and header that carry the read-your-own-writes position
    ///     (`DBContext.consistencyToken`) between requests. Default `"X-WAL-LSN"`:
    ///     a position sent back in that cookie or header routes the request's replica reads to
    ///     a replica that has it; a request whose commit advanced it answers with the cookie and
    ///     the header. `nil` turns this off.
    ///   - exposesErrorDetails: Put a `DBError`'s description (connect, host, the server's
    ///     reason; never a password) in the error response's message. Default `false`: the
    ///     public learns only what kind of failure it was.
    public init(
        beforeCommit: BeforeCommit? = nil,
        onCommitted: OnCommitted? = nil,
        consistencyTokenName: String? = "X-WAL-LSN",
        exposesErrorDetails: Bool = false
    ) {
        self.beforeCommit = beforeCommit
        self.onCommitted = onCommitted
        self.tokenName = consistencyTokenName
        self.tokenField = consistencyTokenName.flatMap { HTTPField.Name($0) }
        self.exposesErrorDetails = exposesErrorDetails
    }

    public func handle(
        _ request: Request,
        context: Context,
        next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        let incoming = incomingToken(request)
        do {
            return try await handleInContext(request, context: context, incoming: incoming, next: next)
        } catch let error as DBError {
            if error.code == .commitFailed || error.code == .commitOutcomeUnknown {
                // Logged here, where the request's logger is: the client only sees a 500. The
                // message (which may quote the server, and so a value) only at debug level.
                context.logger.warning("the request's transaction did not commit", metadata: [
                    "db.connect": "\(error.connect ?? "")", "db.host": "\(error.host ?? "")", "error.type": "\(error.code)",
                ])
                context.logger.debug("why the transaction did not commit", metadata: ["error.message": "\(error.message)"])
            }
            let answer = error.httpAnswer(exposingDetails: exposesErrorDetails)
            var headers = HTTPFields()
            if let retryAfter = answer.retryAfter { headers[.retryAfter] = "\(retryAfter)" }
            throw HTTPError(HTTPResponse.Status(code: answer.status), headers: headers, message: answer.message)
        }
    }

    private func handleInContext(
        _ request: Request,
        context: Context,
        incoming: String?,
        next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        try await withDBRequest(
            ifActive: .join,
            consistencyToken: incoming,
            beforeCommit: beforeCommit,
            statusCode: { Int($0.status.code) },
            onCommitted: { context, response in
                if let tokenName, let tokenField, let token = context.consistencyToken, token != incoming {
                    response.headers.append(HTTPField(name: .setCookie, value: "\(tokenName)=\(token); Path=/; SameSite=Lax"))
                    response.headers[tokenField] = token
                }
                onCommitted?(context, &response)
            }
        ) {
            try await next(request, context)
        }
    }

    /// The token the client sent back: the header wins over the cookie. Oversized or
    /// non-printable values are ignored (the engine validates the rest).
    private func incomingToken(_ request: Request) -> String? {
        guard let tokenName, let tokenField else { return nil }
        return DBContext.consistencyToken(fromClient: request.headers[tokenField] ?? request.cookies[tokenName]?.value)
    }
}
