import Dispatch
import Synchronization

/// Runs async work from synchronous start-up code (the master's loop, a child's main)
/// and waits for it. The work runs detached, off the calling thread, so this is safe to
/// call from the main thread; never call it on an event loop.
public func runBlocking<T: Sendable>(_ work: @escaping @Sendable () async -> T) -> T {
    let outcome = Mutex<T?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task.detached {
        let value = await work()
        outcome.withLock { $0 = value }
        done.signal()
    }
    done.wait()
    return outcome.withLock { $0! }
}
