#if canImport(Glibc)
import Glibc
#endif
import CChatEngine
import ChatEngine
import NIOCore
import NIOPosix

/// Turns a ChatEngine loop on the worker's NIO event loop thread, so that its connections,
/// the room tables and the bus link stay on one thread with no lock between them.
///
/// NIO cannot watch a descriptor for us without a channel that reads it, and the engine's
/// epoll descriptor cannot be read. So something else watches it and makes a descriptor
/// NIO reads readable; each read turns the loop, without blocking, for as long as there are
/// events, then re-arms the watch. One wake-up per burst, never per message. The watch:
///
/// - `ring` (preferred): a one-shot io_uring poll on the engine's descriptor, armed by this
///   thread. Its completion runs as this thread's task work: it wakes the thread out of
///   NIO's `epoll_wait` (which NIO restarts) and signals an eventfd NIO reads. One thread,
///   one wake-up.
/// - `thread` (where io_uring is missing or forbidden): a small thread waits on an epoll
///   of its own holding the engine's descriptor one-shot (waiting there takes none of the
///   engine's events) and writes a byte to a pipe NIO reads. Two wake-ups a burst, the
///   helper's and NIO's: about 1.25 µs more per handshake on the 2-core machine
///   (BENCHMARKS.md's optimisation log).
final class EngineHost {
    enum Watch: String, Sendable {
        case ring = "io_uring"
        case thread
    }

    let loop: Loop
    /// The loop's application (the loop holds it unowned).
    let application: any LoopApplication
    let eventLoop: any EventLoop
    private(set) var watch = Watch.thread
    /// The io_uring (`ring` only).
    private var ring: OpaquePointer?
    /// The helper thread's epoll descriptor (`thread` only).
    private var helperEpoll: Int32 = -1

    init(loop: Loop, application: any LoopApplication, eventLoop: any EventLoop) {
        self.loop = loop
        self.application = application
        self.eventLoop = eventLoop
    }

    /// Starts watching the engine, with io_uring unless `allowRing` is false or it is not
    /// there; call on the event loop, whose thread the ring then wakes.
    func start(allowRing: Bool = true) -> EventLoopFuture<Watch> {
        var signal: Int32 = -1
        guard allowRing, let ring = chatengine_ring_start(loop.epfd, &signal) else { return startThread() }
        self.ring = ring
        let host = NIOLoopBound(self, eventLoop: eventLoop)
        return read(signal).flatMapThrowing {
            let armed = chatengine_ring_arm(host.value.ring)
            guard armed == 0 else { throw IOError(errnoCode: armed, reason: "io_uring_enter") }
            host.value.watch = .ring
            return .ring
        }.flatMapError { _ in host.value.startThread() }
    }

    private func startThread() -> EventLoopFuture<Watch> {
        var pair: (Int32, Int32) = (-1, -1)
        let piped = withUnsafeMutableBytes(of: &pair) { pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self)) }
        guard piped == 0 else { return eventLoop.makeFailedFuture(IOError(errnoCode: errno, reason: "pipe")) }
        let ends = pair
        _ = fcntl(ends.0, F_SETFD, FD_CLOEXEC)
        _ = fcntl(ends.1, F_SETFD, FD_CLOEXEC)
        helperEpoll = epoll_create1(Int32(EPOLL_CLOEXEC))
        var event = epoll_event(events: EPOLLIN.rawValue | EPOLLONESHOT.rawValue, data: epoll_data_t(fd: loop.epfd))
        guard helperEpoll >= 0, epoll_ctl(helperEpoll, EPOLL_CTL_ADD, loop.epfd, &event) == 0 else {
            return eventLoop.makeFailedFuture(IOError(errnoCode: errno, reason: "epoll"))
        }
        let helperEpoll = helperEpoll
        return read(ends.0).flatMapThrowing {
            let started = chatengine_start_waker(helperEpoll, ends.1)
            guard started == 0 else { throw IOError(errnoCode: started, reason: "pthread_create") }
            return .thread
        }
    }

    /// NIO reads `descriptor` (a pipe's end or an eventfd) and turns the engine after each read.
    private func read(_ descriptor: Int32) -> EventLoopFuture<Void> {
        let host = NIOLoopBound(self, eventLoop: eventLoop)
        return NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(WakeHandler(host: host.value)) }
            }
            .takingOwnershipOfDescriptor(input: descriptor)
            .map { _ in }
    }

    /// One turn of the engine without waiting. While turns find events, the next one is
    /// queued as a task on the event loop, which runs it after NIO's own events: a busy
    /// engine is polled without the watch's round trip. The first empty turn re-arms the
    /// watch, which reports at once if events came meanwhile.
    func turn() {
        guard loop.turn(timeout: 0) == 0 else {
            eventLoop.assumeIsolated().execute { [self] in turn() }
            return
        }
        switch watch {
        case .ring:
            guard chatengine_ring_arm(ring) == 0 else {
                // Not armed, nothing would wake the engine: look again shortly instead.
                eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(1)) { [self] in turn() }
                return
            }
        case .thread:
            var event = epoll_event(events: EPOLLIN.rawValue | EPOLLONESHOT.rawValue, data: epoll_data_t(fd: loop.epfd))
            _ = epoll_ctl(helperEpoll, EPOLL_CTL_MOD, loop.epfd, &event)
        }
    }

    private final class WakeHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let host: EngineHost
        init(host: EngineHost) { self.host = host }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
        func channelReadComplete(context: ChannelHandlerContext) { host.turn() }
    }
}
