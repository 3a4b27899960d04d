#if canImport(Glibc)
import Glibc
#endif
import ChatSystem
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOExtras
import NIOPosix

/// The part every child process shares: one event loop, the control link to the master
/// (ready, heartbeats, stop requests), and the rule that a child never outlives its
/// master (parent-death signal, and a lost link stops the child too).
public final class ChildRuntime: Sendable {
    public let group: MultiThreadedEventLoopGroup
    public let eventLoop: any EventLoop
    private let logger: Logger
    private let link: NIOLockedValueBox<(any Channel)?>
    private let stopped: EventLoopPromise<Void>

    /// Creates the child's one event loop. Call `connect` once the child's own state exists.
    public init(logger: Logger) {
        if let master = ProcessEnvironment.current()["CHATGW_MASTER_PID"].flatMap({ pid_t($0) }) {
            ProcessControl.dieWithParent(signal: SIGTERM, expectedParent: master)
        }
        SignalQueue.ignore(SIGPIPE)
        self.logger = logger
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        eventLoop = group.next()
        stopped = eventLoop.makePromise()
        link = NIOLockedValueBox(nil)
    }

    /// Opens the link to the master and starts heartbeats.
    /// - Parameters:
    ///   - stats: called on the loop before every heartbeat.
    ///   - onStop: called on the loop, at most once, when the master (or SIGTERM, or a lost
    ///     link) asks the child to stop. The child calls `finish()` when it is done.
    public func connect(
        heartbeatInterval: TimeAmount,
        stats: @escaping @Sendable () -> ChildStats,
        onStop: @escaping @Sendable (StopReason, TimeAmount) -> Void
    ) throws {
        let logger = logger
        let stopOnce = StopOnce(onStop)
        let channel = try ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineBasedFrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(LinkHandler(logger: logger, stop: stopOnce))
                }
            }
            .withConnectedSocket(Descriptors.childLinkFD)
            .wait()
        link.withLockedValue { $0 = channel }
        eventLoop.scheduleRepeatedTask(initialDelay: heartbeatInterval, delay: heartbeatInterval) { _ in
            var figures = stats()
            figures.residentBytes = ProcessControl.residentBytes()
            Self.send(.heartbeat(figures), on: channel)
        }
        let loop = eventLoop
        SignalQueue.ignore(SIGTERM)
        let terminate = DispatchSource.makeSignalSource(signal: SIGTERM, queue: .global())
        terminate.setEventHandler {
            loop.execute { stopOnce.fire(.shutdown, .zero) }
        }
        terminate.resume()
        signalSources.append(terminate)
    }

    /// Tells the master this child serves now.
    public func reportReady() {
        guard let channel = link.withLockedValue({ $0 }) else { return }
        Self.send(.ready, on: channel)
    }

    /// Blocks the calling (main) thread until `finish()`; then exits the process.
    public func runUntilFinished() -> Never {
        try? stopped.futureResult.wait()
        logger.info("exiting")
        exit(0)
    }

    /// Ends the child once it has said goodbye to everyone.
    public func finish() {
        stopped.succeed(())
    }

    private static func send(_ message: LinkMessage, on channel: any Channel) {
        let bytes = message.encodedLine()
        channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
    }
}

/// Keeps the signal sources alive for the life of the process.
nonisolated(unsafe) private var signalSources: [any DispatchSourceSignal] = []

/// Runs the stop action the first time any of the stop triggers fires.
private final class StopOnce: Sendable {
    private let action: NIOLockedValueBox<(@Sendable (StopReason, TimeAmount) -> Void)?>
    init(_ action: @escaping @Sendable (StopReason, TimeAmount) -> Void) { self.action = NIOLockedValueBox(action) }

    func fire(_ reason: StopReason, _ window: TimeAmount) {
        let pending = action.withLockedValue { action in
            defer { action = nil }
            return action
        }
        pending?(reason, window)
    }
}

private final class LinkHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let logger: Logger
    private let stop: StopOnce

    init(logger: Logger, stop: StopOnce) {
        self.logger = logger
        self.stop = stop
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let line = unwrapInboundIn(data)
        switch try? LinkMessage.decode(line: line.readableBytesView) {
        case .stop(let reason, let windowMs):
            stop.fire(reason, .milliseconds(Int64(windowMs)))
        default:
            logger.warning("unexpected message on master link")
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.warning("master link lost, stopping")
        stop.fire(.shutdown, .zero)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
