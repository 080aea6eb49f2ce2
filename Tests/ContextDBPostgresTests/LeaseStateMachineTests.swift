@testable import ContextDBPostgres
import Testing

/// The pool's bookkeeping, driven with a mock clock and mock connections: no server, no waiting.
@Suite struct LeaseStateMachineTests {
    final class MockConnection: CustomStringConvertible {
        let id: Int
        init(_ id: Int) { self.id = id }
        var description: String { "connection \(id)" }
    }

    /// A point in mock time: seconds since the test began.
    struct MockInstant: InstantProtocol {
        var offset: Duration
        func advanced(by duration: Duration) -> MockInstant { MockInstant(offset: offset + duration) }
        func duration(to other: MockInstant) -> Duration { other.offset - offset }
        static func < (lhs: MockInstant, rhs: MockInstant) -> Bool { lhs.offset < rhs.offset }
        static func seconds(_ value: Double) -> MockInstant { MockInstant(offset: .milliseconds(Int(value * 1000))) }
    }

    struct ConnectError: Error, Equatable { let reason: String }

    typealias Machine = LeaseStateMachine<MockConnection, Int, MockInstant>

    private func machine(maximum: Int = 2, resets: Bool = true) -> Machine {
        Machine(configuration: .init(
            maximumConnections: maximum, leaseTimeout: .seconds(30), idleTimeout: .seconds(60),
            resetsOnRelease: resets, connectRetryDelay: .seconds(1)
        ))
    }

    /// Leases through `lease` then `wait`, as the engine does; returns whether a connect started.
    @discardableResult
    private func queue(_ machine: inout Machine, waiter: Int, at now: MockInstant = .seconds(0)) -> Bool {
        guard case .wait = machine.lease(now: now) else {
            Issue.record("expected the lease to wait")
            return false
        }
        guard case .queued(let connect, _) = machine.wait(id: waiter, waiter: waiter, now: now) else {
            Issue.record("expected the waiter to be queued")
            return false
        }
        return connect
    }

    /// A connection opened for waiter 1 and handed to it at time 0.
    private func leased(_ machine: inout Machine) -> MockConnection {
        queue(&machine, waiter: 1)
        let connection = MockConnection(1)
        _ = machine.connected(connection, now: .seconds(0))
        return connection
    }

    private func handedOut(_ action: Machine.ReturnAction) -> (Int, MockConnection)? {
        if case .handOut(let waiter, let connection) = action { return (waiter, connection) }
        return nil
    }

    @Test func aLeaseWaitsAndConnectsOnlyUpToTheMaximum() {
        var machine = machine(maximum: 2)
        #expect(queue(&machine, waiter: 1))
        #expect(queue(&machine, waiter: 2))
        #expect(!queue(&machine, waiter: 3), "the pool is full: the third waits for a release")
        #expect(machine.connectingCount == 2 && machine.waitingCount == 3)
        let first = MockConnection(1)
        let served = handedOut(machine.connected(first, now: .seconds(0.1)))
        #expect(served?.0 == 1 && served?.1 === first, "first come, first served")
        #expect(machine.leasedCount == 1 && machine.connectionCount == 2)
    }

    @Test func theMostRecentlyReleasedConnectionServesTheNextLeaseAfterItsReset() {
        var machine = machine(maximum: 2)
        queue(&machine, waiter: 1)
        queue(&machine, waiter: 2)
        let a = MockConnection(1), b = MockConnection(2)
        _ = machine.connected(a, now: .seconds(0))
        _ = machine.connected(b, now: .seconds(0))
        for connection in [a, b] {
            guard case .reset(let resetting) = machine.release(connection, reusable: true, now: .seconds(1)) else {
                Issue.record("a clean release is reset first")
                return
            }
            #expect(resetting === connection)
        }
        // Nothing is idle while both are being reset: a lease waits, and no connect starts
        // (two resets are on their way for it).
        #expect(!queue(&machine, waiter: 3, at: .seconds(1)))
        let served = handedOut(machine.resetFinished(a, succeeded: true, now: .seconds(1.1)))
        #expect(served?.0 == 3 && served?.1 === a)
        _ = machine.resetFinished(b, succeeded: true, now: .seconds(1.2))
        _ = machine.release(a, reusable: true, now: .seconds(2))
        _ = machine.resetFinished(a, succeeded: true, now: .seconds(2.1))
        guard case .handOut(let next) = machine.lease(now: .seconds(3)) else {
            Issue.record("an idle connection serves a lease at once")
            return
        }
        #expect(next === a, "the most recently returned connection is taken first")
    }

    @Test func aDirtyReleaseClosesTheConnectionAndConnectsAReplacementForAWaiter() {
        var machine = machine(maximum: 1)
        let a = leased(&machine)
        #expect(!queue(&machine, waiter: 2))
        guard case .close(let closed, let connect) = machine.release(a, reusable: false, now: .seconds(1)) else {
            Issue.record("a dirty connection is closed")
            return
        }
        #expect(closed === a && connect, "the waiter gets a new connection")
        #expect(machine.connectionCount == 1 && machine.connectingCount == 1)
    }

    @Test func aFailedResetClosesTheConnection() {
        var machine = machine(maximum: 1)
        let a = leased(&machine)
        _ = machine.release(a, reusable: true, now: .seconds(1))
        guard case .close(let closed, let connect) = machine.resetFinished(a, succeeded: false, now: .seconds(1)) else {
            Issue.record("a connection whose reset failed is closed")
            return
        }
        #expect(closed === a && !connect)
        #expect(machine.connectionCount == 0)
    }

    @Test func theResetCanBeTurnedOff() {
        var machine = machine(maximum: 1, resets: false)
        let a = leased(&machine)
        guard case .none = machine.release(a, reusable: true, now: .seconds(1)) else {
            Issue.record("without a reset, a clean connection is idle at once")
            return
        }
        guard case .handOut(let next) = machine.lease(now: .seconds(1)) else { return }
        #expect(next === a)
    }

    @Test func aConnectFailureFailsTheWaitersNothingCanServeAndStopsNewLoginsForTheRetryDelay() {
        var machine = machine(maximum: 2)
        queue(&machine, waiter: 1)
        queue(&machine, waiter: 2)
        let refused = ConnectError(reason: "password authentication failed")
        let failed = machine.connectFailed(refused, now: .seconds(0.5))
        #expect(failed == [2], "one connect is still on its way: it serves the oldest waiter")
        let failedToo = machine.connectFailed(refused, now: .seconds(0.6))
        #expect(failedToo == [1])
        #expect(machine.waitingCount == 0 && machine.connectionCount == 0)
        // Within the retry delay a lease fails at once with the server's reason: no new login.
        guard case .fail(.connectFailed(let error)) = machine.lease(now: .seconds(1.2)) else {
            Issue.record("a lease right after a failed connect fails fast")
            return
        }
        #expect(error as? ConnectError == refused)
        #expect(machine.connectingCount == 0)
        // After it, the next lease tries again.
        #expect(queue(&machine, waiter: 3, at: .seconds(1.7)))
    }

    @Test func aConnectFailureWhileConnectionsAreLeasedLetsTheOldestWaitForThem() {
        var machine = machine(maximum: 2)
        let a = leased(&machine)
        #expect(queue(&machine, waiter: 2))
        #expect(!queue(&machine, waiter: 3))
        let failed = machine.connectFailed(ConnectError(reason: "too many clients"), now: .seconds(1))
        #expect(failed == [3], "the leased connection can serve one waiter; the newest fails")
        // While a connection is leased, a lease waits for it instead of failing fast.
        #expect(!queue(&machine, waiter: 4, at: .seconds(1.1)), "no login within the retry delay")
        _ = machine.release(a, reusable: true, now: .seconds(1.2))
        let served = handedOut(machine.resetFinished(a, succeeded: true, now: .seconds(1.3)))
        #expect(served?.0 == 2)
        // Once the delay is over, the timer opens a connection for the waiter left.
        let tick = machine.tick(now: .seconds(2.1))
        #expect(tick.connects == 1 && tick.expired.isEmpty)
    }

    @Test func onceTheRetryDelayIsOverEveryWaiterGetsAConnectAtOnce() {
        var machine = machine(maximum: 3)
        _ = leased(&machine)
        #expect(queue(&machine, waiter: 2, at: .seconds(0)))
        _ = machine.connectFailed(ConnectError(reason: "the database system is starting up"), now: .seconds(0.1))
        // Within the delay, waiters queue (a leased connection may serve them) without connects.
        #expect(!queue(&machine, waiter: 3, at: .seconds(0.5)))
        #expect(machine.connectingCount == 0 && machine.waitingCount == 2)
        // After it, one tick opens a connection for each of them, up to the maximum.
        let tick = machine.tick(now: .seconds(1.2))
        #expect(tick.connects == 2)
        #expect(machine.connectionCount == 3)
    }

    @Test func aWaiterThatTimesOutAfterAFailedConnectGetsItsReason() {
        var machine = machine(maximum: 2)
        _ = leased(&machine)
        queue(&machine, waiter: 2, at: .seconds(0))
        _ = machine.connectFailed(ConnectError(reason: "too many clients"), now: .seconds(0.1))
        let tick = machine.tick(now: .seconds(30))
        #expect(tick.expired == [2])
        #expect(tick.reason as? ConnectError == ConnectError(reason: "too many clients"))
    }

    @Test func aWaiterTimesOutOneLeaseTimeoutAfterItsLeaseArrivedNotAfterItQueued() {
        var machine = machine(maximum: 1)
        _ = leased(&machine)
        guard case .wait = machine.lease(now: .seconds(5)),
              case .queued = machine.wait(id: 2, waiter: 2, now: .seconds(5), arrived: .seconds(1)) else {
            Issue.record("expected the waiter to be queued")
            return
        }
        #expect(machine.tick(now: .seconds(30.9)).expired.isEmpty)
        #expect(machine.tick(now: .seconds(31)).expired == [2], "arrived at 1 s: 30 s later, not 35 s")
    }

    @Test func aWaiterFailsAtTheLeaseTimeout() {
        var machine = machine(maximum: 1)
        _ = leased(&machine)
        queue(&machine, waiter: 2, at: .seconds(1))
        queue(&machine, waiter: 3, at: .seconds(20))
        #expect(machine.tick(now: .seconds(30.9)).expired.isEmpty)
        let tick = machine.tick(now: .seconds(31))
        #expect(tick.expired == [2] && tick.keepTicking)
        #expect(tick.reason == nil, "no connect failed: the plain timeout")
        #expect(machine.tick(now: .seconds(50)).expired == [3])
    }

    @Test func anIdleConnectionClosesAfterTheIdleTimeoutAndTheTimerStops() {
        var machine = machine(maximum: 1)
        let a = leased(&machine)
        _ = machine.release(a, reusable: true, now: .seconds(1))
        guard case .none(let startTimer) = machine.resetFinished(a, succeeded: true, now: .seconds(2)) else { return }
        #expect(!startTimer, "the timer already runs for the waiter")
        #expect(machine.tick(now: .seconds(61)).close.isEmpty)
        let tick = machine.tick(now: .seconds(62))
        #expect(tick.close.count == 1 && tick.close.first === a)
        #expect(!tick.keepTicking && machine.connectionCount == 0)
        #expect(machine.tickInterval == .seconds(1))
    }

    @Test func theTimerStartsOnceWhileItRuns() {
        var machine = machine(maximum: 4)
        guard case .queued(_, let first) = machine.wait(id: 1, waiter: 1, now: .seconds(0)),
              case .queued(_, let second) = machine.wait(id: 2, waiter: 2, now: .seconds(0)) else { return }
        #expect(first && !second)
        #expect(machine.tickInterval == .milliseconds(100))
    }

    @Test func aCancelledWaiterLeavesTheQueueAndItsConnectionGoesIdle() {
        var machine = machine(maximum: 1)
        queue(&machine, waiter: 1)
        #expect(machine.cancel(id: 1) == 1)
        #expect(machine.cancel(id: 1) == nil, "a waiter is resumed once")
        let a = MockConnection(1)
        guard case .none = machine.connected(a, now: .seconds(0)) else {
            Issue.record("nobody waits: the new connection is idle")
            return
        }
        guard case .handOut(let next) = machine.lease(now: .seconds(0)) else { return }
        #expect(next === a)
    }

    @Test func anIdleConnectionTheServerClosedLeavesThePool() {
        var machine = machine(maximum: 1, resets: false)
        let a = leased(&machine)
        _ = machine.release(a, reusable: true, now: .seconds(0))
        machine.closed(a)
        #expect(machine.connectionCount == 0)
        #expect(queue(&machine, waiter: 2), "a lease connects anew")
    }

    @Test func aReleaseOfAnUnknownConnectionIsIgnored() {
        var machine = machine(maximum: 1)
        guard case .none = machine.release(MockConnection(9), reusable: true, now: .seconds(0)) else {
            Issue.record("a double or foreign release changes nothing")
            return
        }
        #expect(machine.connectionCount == 0)
    }

    @Test func shutdownFailsWaitersAndClosesEveryConnection() {
        var machine = machine(maximum: 3)
        queue(&machine, waiter: 1)
        queue(&machine, waiter: 2)
        queue(&machine, waiter: 3)
        let idle = MockConnection(1), leased = MockConnection(2), resetting = MockConnection(3)
        for connection in [idle, leased, resetting] { _ = machine.connected(connection, now: .seconds(0)) }
        _ = machine.release(resetting, reusable: true, now: .seconds(1))
        _ = machine.release(idle, reusable: true, now: .seconds(1))
        _ = machine.resetFinished(idle, succeeded: true, now: .seconds(1))
        let action = machine.shutdown()
        #expect(Set(action.close.map(\.id)) == [1, 2, 3], "idle, leased and resetting connections all close")
        #expect(machine.isShutDown && machine.connectionCount == 0)
        guard case .fail(.shutdown) = machine.lease(now: .seconds(2)) else {
            Issue.record("a lease after shutdown fails")
            return
        }
        guard case .none = machine.release(leased, reusable: true, now: .seconds(2)) else {
            Issue.record("a release after shutdown changes nothing: the connection was closed")
            return
        }
        guard case .none = machine.resetFinished(resetting, succeeded: true, now: .seconds(2)) else {
            Issue.record("a reset that finishes after shutdown changes nothing: the connection was closed")
            return
        }
        #expect(machine.tick(now: .seconds(3)).keepTicking == false)
    }

    @Test func shutdownFailsTheWaitersAndALateConnectClosesItsConnection() {
        var machine = machine(maximum: 2)
        queue(&machine, waiter: 1)
        queue(&machine, waiter: 2)
        _ = machine.connected(MockConnection(1), now: .seconds(0))
        let action = machine.shutdown()
        #expect(action.fail == [2] && action.close.map(\.id) == [1])
        guard case .close(let late, let connect) = machine.connected(MockConnection(2), now: .seconds(1)) else {
            Issue.record("a connect that finishes after shutdown closes its connection")
            return
        }
        #expect(late.id == 2 && !connect)
    }
}
