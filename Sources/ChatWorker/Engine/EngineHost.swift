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
/// epoll descriptor cannot be read. So a small thread waits on it (through an epoll of its
/// own holding it one-shot: waiting there takes none of the engine's events) and writes a
/// byte to a pipe that NIO reads; each read turns the loop, without blocking, for as long
/// as there are events, then re-arms the watch. One wake-up per burst, never per message.
final class EngineHost {
    let loop: Loop
    /// The loop's application (the loop holds it unowned).
    let front: EngineFront
    let eventLoop: any EventLoop
    private let watch: Int32

    init(loop: Loop, front: EngineFront, eventLoop: any EventLoop) {
        self.loop = loop
        self.front = front
        self.eventLoop = eventLoop
        watch = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(watch >= 0, "epoll_create1: \(errno)")
    }

    /// Starts the pipe's channel and the waker; call on the event loop.
    func start() -> EventLoopFuture<Void> {
        var pair: (Int32, Int32) = (-1, -1)
        let piped = withUnsafeMutableBytes(of: &pair) { pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self)) }
        guard piped == 0 else { return eventLoop.makeFailedFuture(IOError(errnoCode: errno, reason: "pipe")) }
        let ends = pair
        _ = fcntl(ends.0, F_SETFD, FD_CLOEXEC)
        _ = fcntl(ends.1, F_SETFD, FD_CLOEXEC)
        var event = epoll_event(events: EPOLLIN.rawValue | EPOLLONESHOT.rawValue, data: epoll_data_t(fd: loop.epfd))
        guard epoll_ctl(watch, EPOLL_CTL_ADD, loop.epfd, &event) == 0 else {
            return eventLoop.makeFailedFuture(IOError(errnoCode: errno, reason: "epoll_ctl"))
        }
        let host = NIOLoopBound(self, eventLoop: eventLoop)
        let watch = watch
        return NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(WakeHandler(host: host.value)) }
            }
            .takingOwnershipOfDescriptor(input: ends.0)
            .flatMapThrowing { _ in
                let started = chatengine_start_waker(watch, ends.1)
                guard started == 0 else { throw IOError(errnoCode: started, reason: "pthread_create") }
            }
    }

    /// One turn of the engine without waiting. While turns find events, the next one is
    /// queued as a task on the event loop, which runs it after NIO's own events: a busy
    /// engine is polled without the waker's round trip (two context switches and a pipe
    /// write). The first empty turn re-arms the watch, which reports at once if events
    /// came meanwhile.
    func turn() {
        guard loop.turn(timeout: 0) == 0 else {
            eventLoop.assumeIsolated().execute { [self] in turn() }
            return
        }
        var event = epoll_event(events: EPOLLIN.rawValue | EPOLLONESHOT.rawValue, data: epoll_data_t(fd: loop.epfd))
        _ = epoll_ctl(watch, EPOLL_CTL_MOD, loop.epfd, &event)
    }

    private final class WakeHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let host: EngineHost
        init(host: EngineHost) { self.host = host }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
        func channelReadComplete(context: ChannelHandlerContext) { host.turn() }
    }
}
