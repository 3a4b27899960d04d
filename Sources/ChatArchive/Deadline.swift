import Synchronization

/// Runs `operation` and returns what it returns, or throws `timedOut()` once `limit` has passed
/// without an answer. Then the operation is cancelled and left behind: this returns at once
/// even when the operation ignores cancellation and never ends.
///
/// That is the case it exists for. PostgresNIO's `query` does not end when its task is
/// cancelled (it awaits a future), and it can wait for good: a query written just as the
/// server closes the connection is dropped by NIO with no answer and no error (PostgresNIO
/// 1.33.2 writes it with `promise: nil`). A task group would wait for such a child too.
/// Cancelling the operation still helps in the usual case: a query waiting for a
/// connection from the pool is taken out of its queue.
func withDeadline<T: Sendable>(
    _ limit: Duration, failing timedOut: @escaping @Sendable () -> any Error,
    _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    let outcome = Outcome<T>()
    let work = Task {
        do { outcome.settle(.success(try await operation())) } catch { outcome.settle(.failure(error)) }
    }
    let timer = Task {
        try await Task.sleep(for: limit)
        work.cancel()
        outcome.settle(.failure(timedOut()))
    }
    defer { timer.cancel() }
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { outcome.deliver(to: $0) }
    } onCancel: {
        work.cancel()
    }
}

/// The first of the operation's result and the deadline, for one waiter that may come
/// before or after it.
private final class Outcome<T: Sendable>: Sendable {
    private enum State: Sendable {
        case open
        case settled(Result<T, any Error>)
        case waiting(CheckedContinuation<T, any Error>)
        case delivered
    }

    private let state = Mutex(State.open)

    func settle(_ result: Result<T, any Error>) {
        let waiter: CheckedContinuation<T, any Error>? = state.withLock { state in
            switch state {
            case .open:
                state = .settled(result)
                return nil
            case .waiting(let waiter):
                state = .delivered
                return waiter
            case .settled, .delivered:
                return nil
            }
        }
        waiter?.resume(with: result)
    }

    func deliver(to waiter: CheckedContinuation<T, any Error>) {
        let result: Result<T, any Error>? = state.withLock { state in
            switch state {
            case .settled(let result):
                state = .delivered
                return result
            case .open:
                state = .waiting(waiter)
                return nil
            case .waiting, .delivered:
                preconditionFailure("an outcome has one waiter")
            }
        }
        if let result { waiter.resume(with: result) }
    }
}
