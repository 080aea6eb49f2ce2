import ServiceLifecycle
import Synchronization

extension DBConnect: Service {
    /// Background work of an engine, run by ``run()`` as a child task.
    enum EngineJob: Sendable {
        /// The engine's own work, until it shuts down.
        case run(Engine)
        /// Waiting for a retired engine's sessions to give their connections back, then shutting it down.
        case drain(Engine)
    }

    /// Runs the background work of this connect's engines — for PostgreSQL, opening connections,
    /// closing idle ones and timing out leases; draining the engines of retired hosts — as child
    /// tasks, until a graceful shutdown (ServiceLifecycle) or until the task is cancelled; then
    /// shuts every engine down (``close()``) and returns once their work has ended.
    ///
    /// A connect is a ServiceLifecycle `Service`: add it to your `ServiceGroup` before the
    /// services that use it (a group shuts down in reverse order), or to Hummingbird's
    /// `Application(services:)` (the server shuts down first). Engines created before `run()`
    /// starts wait for it; an engine with background work (PostgreSQL's) used while nothing
    /// runs its connect fails its leases with ``DBError/Code/notRunning`` at its lease timeout.
    /// Run each connect once.
    /// - Throws: ``DBError/Code/invalidConfiguration`` when `run()` was already called.
    public func run() async throws {
        let first = state.withLock { state in
            defer { state.runStarted = true }
            return !state.runStarted
        }
        guard first else {
            throw DBError(.invalidConfiguration, "run() was already called on this connect; run each connect once", connect: label)
        }
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for await job in jobs {
                    switch job {
                    case .run(let engine): group.addTask { await engine.run() }
                    case .drain(let engine): group.addTask { await engine.drainAndShutdown() }
                    }
                }
                // Shut down (cancelled, or a graceful shutdown): every engine's run() returns.
                await close()
            }
        } onGracefulShutdown: {
            self.jobQueue.finish()
        }
    }
}
