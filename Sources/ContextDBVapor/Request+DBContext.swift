import ContextDB
import Vapor

extension Request {
    /// The request's `DBContext`, as `DBSessionMiddleware` opened it (or the context a test ran
    /// the request in); `nil` outside the middleware.
    ///
    /// Unlike `DBContext.current`, a task-local, it is reachable in every route style — also in
    /// the callbacks of a route that returns an `EventLoopFuture`.
    public var dbContext: DBContext? {
        storage[RequestDBContextKey.self]
    }

    /// Runs `body` with the request's context as `DBContext.current`: every session it asks for
    /// is the request's, committed or rolled back with the request.
    ///
    /// ```swift
    /// app.get("items", ":id") { request -> EventLoopFuture<String> in
    ///     request.eventLoop.makeFutureWithTask {
    ///         try await request.withDBContext {
    ///             try await replica.session().queryValue("SELECT text FROM items WHERE id = 1", as: String.self) ?? ""
    ///         }
    ///     }
    /// }
    /// ```
    /// - Parameters:
    ///   - isolation: The caller's actor, passed implicitly (`#isolation`): `body` runs on it.
    ///   - body: The work.
    /// - Returns: What `body` returns.
    /// - Throws: `DBError.Code.noContext` when the request has no context (the middleware
    ///   is missing from its route), or what `body` throws.
    public func withDBContext<R>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> R
    ) async throws -> R {
        if let current = DBContext.current, current === dbContext { return try await body() }
        guard let context = dbContext else {
            throw DBError(
                .noContext,
                "this request has no DBContext; add DBSessionMiddleware to the application's or the route group's middleware"
            )
        }
        return try await context.run(body)
    }

    /// The request's session of `connect` — the one the middleware commits or rolls back with
    /// the request — in any route style.
    /// - Parameter connect: The connection, as for `DBConnect.session()`.
    /// - Returns: The request's session of `connect`, created on first use.
    /// - Throws: `DBError.Code.noContext` without the middleware, or what
    ///   `DBConnect.session()` throws.
    public func dbSession<Engine: DatabaseEngine>(_ connect: DBConnect<Engine>) async throws -> DBSession<Engine> {
        try await withDBContext { try await connect.session() }
    }
}
