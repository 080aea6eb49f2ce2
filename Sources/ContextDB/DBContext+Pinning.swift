import Synchronization

/// Sessions pinned by a transactional test (`DBSession.withSavepointSessions`): a nested context
/// inherits them, so the test's connection serves every session of the request.
extension DBContext {
    func pinnedSession<Engine>(for connect: DBConnect<Engine>) -> DBSession<Engine>? {
        state.withLock { state in
            state.pinned[ObjectIdentifier(connect)].map { storedSession($0.session, of: connect) }
        }
    }

    var hasPinnedSessions: Bool { state.withLock { !$0.pinned.isEmpty } }

    func pin<Engine>(_ session: DBSession<Engine>, for connect: DBConnect<Engine>) {
        let key = ObjectIdentifier(connect)
        state.withLock { $0.pinned[key] = Entry(key: key, session: session) }
    }
}
