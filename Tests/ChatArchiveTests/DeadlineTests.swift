import Synchronization
import Testing
@testable import ChatArchive

@Suite struct DeadlineTests {
    struct TimedOut: Error {}
    struct Refused: Error {}

    @Test func anAnswerInTimeIsReturned() async throws {
        let value = try await withDeadline(.seconds(10), failing: { TimedOut() }) { 42 }
        #expect(value == 42)
        await #expect(throws: Refused.self) {
            try await withDeadline(.seconds(10), failing: { TimedOut() }) { () async throws -> Int in throw Refused() }
        }
    }

    /// What PostgresNIO's query did after an outage: it never returned and ignored
    /// cancellation. The deadline still ends the wait, and cancels the operation. (No upper
    /// bound on the wait: the test run's other suites may hold every cooperative thread
    /// for seconds. Waiting for good, the time limit fails it.)
    @Test(.timeLimit(.minutes(1)))
    func anOperationThatNeverAnswersAndIgnoresCancellationIsLeftBehind() async throws {
        let hung = HungOperation()
        let started = ContinuousClock.now
        await #expect(throws: TimedOut.self) {
            try await withDeadline(.milliseconds(100), failing: { TimedOut() }) { await hung.run() }
        }
        #expect(ContinuousClock.now - started >= .milliseconds(100))
        #expect(hung.wasCancelled)
        hung.release()
    }

    @Test(.timeLimit(.minutes(1)))
    func cancellingTheCallerCancelsTheOperation() async throws {
        let caller = Task {
            try await withDeadline(.seconds(60), failing: { TimedOut() }) {
                try await Task.sleep(for: .seconds(60))
                return 0
            }
        }
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
    }
}

/// An operation that waits until released, whether or not its task is cancelled.
private final class HungOperation: Sendable {
    private let state = Mutex<(waiter: CheckedContinuation<Int, Never>?, released: Bool, cancelled: Bool)>((nil, false, false))

    var wasCancelled: Bool { state.withLock { $0.cancelled } }

    func run() async -> Int {
        await withTaskCancellationHandler {
            await withCheckedContinuation { waiter in
                let releasedAlready = state.withLock { state in
                    if !state.released { state.waiter = waiter }
                    return state.released
                }
                if releasedAlready { waiter.resume(returning: 0) }
            }
        } onCancel: {
            state.withLock { $0.cancelled = true }
        }
    }

    func release() {
        let waiter = state.withLock { state in
            state.released = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: 0)
    }
}
