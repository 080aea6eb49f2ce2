import ContextDB

extension DBControlStatement {
    /// The statement as PostgreSQL reads it (PostgreSQL docs, "BEGIN", "SAVEPOINT").
    package var postgresSQL: String {
        switch self {
        case .begin(let options):
            var sql = "BEGIN"
            if let level = options.isolationLevel { sql += " ISOLATION LEVEL \(level.postgresSQL)" }
            if options.readOnly { sql += " READ ONLY" }
            return sql
        case .commit: return "COMMIT"
        case .rollback: return "ROLLBACK"
        case .savepoint(let name): return "SAVEPOINT \(name)"
        case .releaseSavepoint(let name): return "RELEASE SAVEPOINT \(name)"
        case .rollbackToSavepoint(let name): return "ROLLBACK TO SAVEPOINT \(name)"
        }
    }
}

extension DBIsolationLevel {
    /// The level as PostgreSQL writes it.
    package var postgresSQL: String {
        switch self {
        case .readUncommitted: return "READ UNCOMMITTED"
        case .readCommitted: return "READ COMMITTED"
        case .repeatableRead: return "REPEATABLE READ"
        case .serializable: return "SERIALIZABLE"
        }
    }
}
