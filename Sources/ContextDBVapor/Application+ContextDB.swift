import Logging
import ServiceLifecycle
import Synchronization
import Vapor

extension Application {
    /// The ContextDB services this application starts and stops: its `DBConnect`s and a
    /// `PostgresTopology`, which are ServiceLifecycle `Service`s.
    ///
    /// ```swift
    /// app.contextDB.use(topology, primary, replica)
    /// ```
    ///
    /// They run from the application's boot (Vapor's `LifecycleHandler.didBoot`) until its
    /// shutdown, which stops them gracefully: each connect drains its engines and closes their
    /// connections before `asyncShutdown()` returns.
    public var contextDB: ContextDBServices {
        if let services = storage[ContextDBServicesKey.self] { return services }
        let services = ContextDBServices(logger: logger)
        storage[ContextDBServicesKey.self] = services
        lifecycle.use(services)
        return services
    }
}

/// Runs an application's ContextDB services as one ServiceLifecycle `ServiceGroup`, from the
/// application's boot to its shutdown. Get it from ``Vapor/Application/contextDB``.
public final class ContextDBServices: LifecycleHandler {
    private struct State {
        var services: [any Service] = []
        var booted = false
        var group: ServiceGroup?
        var running: Task<Void, Never>?
    }

    private let logger: Logger
    private let state = Mutex(State())

    init(logger: Logger) {
        self.logger = logger
    }

    /// Adds services to start at boot, in order; the group shuts them down in reverse order.
    /// - Parameter services: Connects, topologies — any ServiceLifecycle `Service`.
    /// - Precondition: The application has not booted yet.
    public func use(_ services: any Service...) {
        state.withLock { state in
            precondition(!state.booted, "add ContextDB services before the application boots")
            state.services += services
        }
    }

    /// Starts the services (a `ServiceGroup` in one task that runs until shutdown). When the
    /// group fails, the application stops: it cannot serve without its database.
    public func didBoot(_ application: Application) throws {
        state.withLock { state in
            guard !state.booted else { return }
            state.booted = true
            guard !state.services.isEmpty else { return }
            let group = ServiceGroup(services: state.services, logger: logger)
            state.group = group
            // Vapor's lifecycle has no task to run services in. This one lives as long as the
            // application and must not inherit the booting task's task-locals (a test's
            // DBContext, a read preference, a trace), hence detached; the group runs each
            // service as a child task of its own.
            state.running = Task.detached { [logger, weak application] in
                do {
                    try await group.run()
                } catch {
                    logger.critical("ContextDB services stopped; stopping the application", metadata: ["error": "\(error)"])
                    application?.running?.stop()
                }
            }
        }
    }

    /// Stops the HTTP server first (no request may start once the database goes), then shuts the
    /// services down gracefully and waits until they have stopped.
    public func shutdownAsync(_ application: Application) async {
        let (group, running) = state.withLock { ($0.group, $0.running) }
        guard let group else { return }
        await application.server.shutdown()
        await group.triggerGracefulShutdown()
        await running?.value
    }

    /// Asks the services to shut down; the synchronous path cannot wait (use `asyncShutdown()`).
    public func shutdown(_ application: Application) {
        guard let group = state.withLock({ $0.group }) else { return }
        Task { await group.triggerGracefulShutdown() }
    }
}

enum ContextDBServicesKey: StorageKey {
    typealias Value = ContextDBServices
}
