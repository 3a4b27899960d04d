#if canImport(Glibc)
import Glibc
#endif
import ChatProtocol
import ChatSystem
import NIOCore

/// What a worker does with connections it has no file for. It keeps one file in reserve;
/// when accept() fails with EMFILE it gives the reserve up, takes each waiting connection,
/// answers it 503 and closes it, then takes the reserve back. A client then learns at once
/// that this worker is full, instead of waiting in its queue until it gives up, and its
/// retry (from another source port) may be hashed to a worker with room. nginx, out of
/// connections, also closes what it cannot serve.
final class OverflowRefusal {
    private let listenFD: Int32
    private var reserve: Int32
    private let answer: [UInt8]
    /// At most this many per failed accept, so that a flood cannot hold the loop; the rest
    /// keep the socket readable and come in the next round.
    private let batch = 256

    init(listenFD: Int32) {
        self.listenFD = listenFD
        reserve = Self.openReserve()
        var answer = HTTPAnswer.refusal(.workerFull, allocator: ByteBufferAllocator())
        answer.extraHeaders = [("Retry-After", "1")]
        self.answer = Array(answer.bytes(ByteBufferAllocator()).readableBytesView)
    }

    deinit {
        if reserve >= 0 { close(reserve) }
    }

    /// Answers the waiting connections; how many, or nil without a reserve to do it with.
    func refuseWaiting() -> Int? {
        guard reserve >= 0 else {
            reserve = Self.openReserve()
            return nil
        }
        close(reserve)
        reserve = -1
        defer { reserve = Self.openReserve() }
        var refused = 0
        var request = [UInt8](repeating: 0, count: 4096)
        while refused < batch, let fd = Descriptors.acceptNonBlocking(listenFD) {
            // Read what the client already sent: closing with unread bytes would reset the
            // connection and could destroy the answer before the client reads it.
            _ = read(fd, &request, request.count)
            _ = answer.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
            refused += 1
        }
        return refused
    }

    private static func openReserve() -> Int32 {
        open("/dev/null", O_RDONLY | O_CLOEXEC)
    }
}
