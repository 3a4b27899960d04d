#if canImport(Glibc)
import Glibc
#endif
import ChatControl
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
    private let finalStats = NIOLockedValueBox<(@Sendable () -> ChildStats)?>(nil)
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

    /// Opens the link to the master and starts heartbeats. Every closure of `commands`
    /// is called on the child's loop.
    public func connect(heartbeatInterval: TimeAmount, commands: ChildCommands) throws {
        let logger = logger
        let stats = commands.stats
        let stopOnce = StopOnce(commands.stop)
        let channel = try ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineBasedFrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(LinkHandler(logger: logger, stop: stopOnce, commands: commands))
                }
            }
            .withConnectedSocket(Descriptors.childLinkFD)
            .wait()
        link.withLockedValue { $0 = channel }
        finalStats.withLockedValue { $0 = stats }
        eventLoop.scheduleRepeatedTask(initialDelay: heartbeatInterval, delay: heartbeatInterval) { _ in
            Self.send(.heartbeat(Self.withProcessFigures(stats())), on: channel)
        }
        let loop = eventLoop
        SignalQueue.ignore(SIGTERM)
        let terminate = DispatchSource.makeSignalSource(signal: SIGTERM, queue: .global())
        terminate.setEventHandler {
            loop.execute { stopOnce.fire(.shutdown, .zero, false) }
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
        // A last heartbeat, so the master's counters include this child's final moments.
        if let channel = link.withLockedValue({ $0 }), let stats = finalStats.withLockedValue({ $0 }) {
            let figures = try? eventLoop.submit { Self.withProcessFigures(stats()) }.wait()
            if let figures {
                let bytes = LinkMessage.heartbeat(figures).encodedLine()
                try? channel.writeAndFlush(channel.allocator.buffer(bytes: bytes)).wait()
            }
        }
        logger.info("exiting")
        exit(0)
    }

    /// Ends the child once it has said goodbye to everyone.
    public func finish() {
        stopped.succeed(())
    }

    /// The child's own figures plus those only the process as a whole knows.
    private static func withProcessFigures(_ stats: ChildStats) -> ChildStats {
        var figures = stats
        figures.residentBytes = ProcessControl.residentBytes()
        figures.fileLimitRefusals = AcceptPause.fileLimitRefusalsTotal
        return figures
    }

    fileprivate static func send(_ message: LinkMessage, on channel: any Channel) {
        let bytes = message.encodedLine()
        channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
    }
}

/// Keeps the signal sources alive for the life of the process.
nonisolated(unsafe) private var signalSources: [any DispatchSourceSignal] = []

/// What a child does when the master asks; each closure runs on the child's loop.
public struct ChildCommands: Sendable {
    /// Figures for the next heartbeat.
    public var stats: @Sendable () -> ChildStats
    /// Stop (at most once): by the master, SIGTERM, or a lost link. Call `finish()` when done.
    public var stop: @Sendable (_ reason: StopReason, _ window: TimeAmount, _ keepAccepting: Bool) -> Void
    public var kick: @Sendable (_ user: String) -> Void
    public var rooms: @Sendable (_ top: Int) -> [RoomStat]

    public init(
        stats: @escaping @Sendable () -> ChildStats,
        stop: @escaping @Sendable (StopReason, TimeAmount, Bool) -> Void,
        kick: @escaping @Sendable (String) -> Void = { _ in },
        rooms: @escaping @Sendable (Int) -> [RoomStat] = { _ in [] }
    ) {
        self.stats = stats
        self.stop = stop
        self.kick = kick
        self.rooms = rooms
    }
}

/// Runs the stop action the first time any of the stop triggers fires.
private final class StopOnce: Sendable {
    private typealias Action = @Sendable (StopReason, TimeAmount, Bool) -> Void
    private let action: NIOLockedValueBox<Action?>
    init(_ action: @escaping @Sendable (StopReason, TimeAmount, Bool) -> Void) { self.action = NIOLockedValueBox(action) }

    func fire(_ reason: StopReason, _ window: TimeAmount, _ keepAccepting: Bool) {
        let pending = action.withLockedValue { action in
            defer { action = nil }
            return action
        }
        pending?(reason, window, keepAccepting)
    }
}

private final class LinkHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let logger: Logger
    private let stop: StopOnce
    private let commands: ChildCommands

    init(logger: Logger, stop: StopOnce, commands: ChildCommands) {
        self.logger = logger
        self.stop = stop
        self.commands = commands
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let line = unwrapInboundIn(data)
        switch try? LinkMessage.decode(line: line.readableBytesView) {
        case .stop(let reason, let windowMs, let keepAccepting):
            stop.fire(reason, .milliseconds(Int64(windowMs)), keepAccepting)
        case .kick(let user):
            commands.kick(user)
        case .roomsRequest(let id, let top):
            ChildRuntime.send(.rooms(id: id, rooms: commands.rooms(top)), on: context.channel)
        default:
            logger.warning("unexpected message on master link")
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.warning("master link lost, stopping")
        stop.fire(.shutdown, .zero, false)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
