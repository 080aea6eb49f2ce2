/// How a session holds its connection and frames its transactions — the one place where a
/// pooled session and a transactional test's savepoint session differ. `DBSession`'s
/// `commit`, `rollback` and `close` are written once, over this.
enum DBSessionMode<Engine: DatabaseEngine>: Sendable {
    /// The session leases connections of its own and runs real transactions on them.
    case pooled
    /// The session runs on a connection a transactional test lends it (`lease`), shared with
    /// the test's other savepoint sessions; its transactions are savepoints in the
    /// connection's own transaction.
    case savepoint(DBSharedConnection<Engine>, lease: DBLease<Engine>)

    /// Whether the session may give its connection back or close it. A borrowed connection
    /// stays with its owner whatever happens to the session's transaction.
    var ownsConnection: Bool {
        if case .pooled = self { return true }
        return false
    }

    /// The statement that opens a transaction, and the savepoint that stands for it.
    func begin(_ options: DBSessionOptions) -> (statement: DBControlStatement, savepoint: String?) {
        switch self {
        case .pooled:
            return (.begin(options), nil)
        case .savepoint(let shared, _):
            let name = shared.nextSavepoint()
            return (.savepoint(name), name)
        }
    }

    /// The statement that commits: `COMMIT`, or `RELEASE SAVEPOINT`.
    func commit(savepoint: String?) -> DBControlStatement {
        guard case .savepoint = self, let savepoint else { return .commit }
        return .releaseSavepoint(savepoint)
    }

    /// The statements that roll back: `ROLLBACK`, or `ROLLBACK TO SAVEPOINT` then
    /// `RELEASE SAVEPOINT`.
    func rollback(savepoint: String?) -> [DBControlStatement] {
        guard case .savepoint = self, let savepoint else { return [.rollback] }
        return [.rollbackToSavepoint(savepoint), .releaseSavepoint(savepoint)]
    }

    /// The phase once the transaction ended (committed, rolled back, or lost): a pooled session
    /// keeps the connection it has, if any; a savepoint session is back on the borrowed one.
    func phase(afterEnding phase: DBSessionPhase) -> DBSessionPhase {
        switch (self, phase) {
        case (.savepoint(_, let lease), _): return .connected(lease)
        case (.pooled, .inTransaction(let lease, _)): return .connected(lease)
        case (.pooled, .lost): return .idle
        case (.pooled, _): return phase
        }
    }
}
