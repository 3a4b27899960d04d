#if canImport(Glibc)
import Glibc
#endif

/// The write end of the self-pipe; a signal handler may touch nothing else.
nonisolated(unsafe) private var signalPipeWriteFD: Int32 = -1

/// Turns asynchronous signals into bytes on a pipe that a poll loop can wait on
/// (the self-pipe trick): handlers only enqueue, the loop does the work.
public final class SignalQueue {
    /// Poll this for readability; then call `drain()`.
    public let readFD: Int32

    public init(signals: [Int32]) throws(SystemError) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw SystemError("pipe") }
        readFD = try Descriptors.moveAbove(fds[0])
        signalPipeWriteFD = try Descriptors.moveAbove(fds[1])
        try Descriptors.setNonBlocking(readFD)
        try Descriptors.setNonBlocking(signalPipeWriteFD)
        for signal in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { number in
                let saved = errno
                var byte = UInt8(truncatingIfNeeded: number)
                _ = write(signalPipeWriteFD, &byte, 1)
                errno = saved
            }
            action.sa_flags = SA_RESTART
            sigemptyset(&action.sa_mask)
            sigaction(signal, &action, nil)
        }
    }

    /// The signals that arrived since the last call, in order.
    public func drain() -> [Int32] {
        var received: [Int32] = []
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            let count = read(readFD, &buffer, buffer.count)
            guard count > 0 else { break }
            received.append(contentsOf: buffer[0..<count].map { Int32($0) })
        }
        return received
    }

    /// Ignores `signal` (SIGPIPE: a dead peer is an error on the write, not a signal; SIGTERM
    /// before a dispatch source takes it over).
    public static func ignore(_ signal: Int32) {
        Glibc.signal(signal, SIG_IGN)
    }
}
