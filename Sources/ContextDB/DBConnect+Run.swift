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
    /// Once `run()` has returned the connect may run again (each `app.test` of HummingbirdTesting
    /// runs the app's services anew), but not twice at once.
    /// - Throws: ``DBError/Code/invalidConfiguration`` when `run()` is already running.
    public func run() async throws {
        let (jobs, queue) = AsyncStream.makeStream(of: EngineJob.self)
        // The run lock, then the state's (the order engine creation takes them in).
        let waiting = runState.withLock { run -> [EngineJob]? in
            guard run.runner == nil else { return nil }
            run.runner = queue
            defer { run.pendingDrains.removeAll() }
            let ready = state.withLock { state in
                state.engines.values.compactMap { slot -> EngineJob? in
                    guard case .ready(let engine) = slot else { return nil }
                    return .run(engine)
                }
            }
            return ready + run.pendingDrains.map { .drain($0) }
        }
        guard let waiting else {
            throw DBError(.invalidConfiguration, "run() is already running on this connect; run each connect once at a time", connect: label)
        }
        for job in waiting { queue.yield(job) }
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for companion in companions.withLock({ $0 }) {
                    // Ends with the graceful shutdown or the cancellation that ends the engines.
                    group.addTask { try? await companion.run() }
                }
                for await job in jobs {
                    switch job {
                    case .run(let engine): group.addTask { await engine.run() }
                    case .drain(let engine): group.addTask { await engine.drainAndShutdown() }
                    }
                }
                // Shut down (cancelled, or a graceful shutdown): every engine's run() returns.
                runState.withLock { $0.runner = nil }
                await close()
            }
        } onGracefulShutdown: {
            queue.finish()
        }
    }
}
