/// How an HTTP server answers a request that a ``DBError`` ended: what the middlewares of
/// `ContextDBHummingbird` and `ContextDBVapor` send.
public struct DBHTTPAnswer: Sendable, Hashable {
    /// The status code: 503, 409 or 500.
    public var status: Int
    /// The `Retry-After` header's value, in seconds (RFC 9110, 10.2.3), for a 503.
    public var retryAfter: Int?
    /// The body's message: what happened, without hosts or SQL unless details are exposed.
    public var message: String
}

extension DBError {
    /// The HTTP answer to a request this error ended.
    ///
    /// | Error | Status |
    /// |---|---|
    /// | no fit host (``Code/noHostAvailable``), a host that cannot be reached or a pool that has no free connection in time (``Code/connectionFailed``), an engine not running (``Code/notRunning``), writes prevented (``Code/writesPrevented``), a lost connection (``Code/connectionLost``, or ``Code/commitFailed`` because the connection was lost before `COMMIT`) | 503, `Retry-After: 1` — when the request had committed nothing, so the client may retry it as a whole |
    /// | the same after the request committed work | 500: a retry could write twice |
    /// | a write in a session of a read-only connect (``Code/readOnlySession``) | 409 |
    /// | anything else: a failed statement or commit, a statement timeout, an engine that could not be created (a configuration error) | 500 |
    ///
    /// - Parameter exposingDetails: Put ``description`` (the connect, the host, the server's
    ///   reason; never a password) in the message. Default `false`: only what kind of failure
    ///   it was, for the public.
    /// - Returns: The status, `Retry-After` and message.
    public func httpAnswer(exposingDetails: Bool = false) -> DBHTTPAnswer {
        let retryable = requestCommittedWork != true
        var answer: DBHTTPAnswer
        switch code {
        case .noHostAvailable where retryable, .connectionFailed where retryable, .notRunning where retryable,
             .connectionLost where retryable, .commitFailed where retryable && lostBeforeCommit:
            answer = DBHTTPAnswer(status: 503, retryAfter: 1, message: "the database cannot serve this request now; retry later")
        case .writesPrevented where retryable:
            answer = DBHTTPAnswer(status: 503, retryAfter: 1, message: "writes are paused for maintenance; retry later")
        case .readOnlySession:
            answer = DBHTTPAnswer(status: 409, message: "this request tried to write through a read-only database connection")
        default:
            answer = DBHTTPAnswer(status: 500, message: "the database failed this request")
        }
        if exposingDetails { answer.message += " (\(description))" }
        return answer
    }

    /// A ``Code/commitFailed`` because the transaction's connection was lost before `COMMIT` was
    /// sent: the server rolled it back, so the request may be retried as a whole.
    private var lostBeforeCommit: Bool { (underlying as? DBError)?.code == .connectionLost }
}
