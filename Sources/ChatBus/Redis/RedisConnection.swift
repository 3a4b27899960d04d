import ChatConfig
import Logging
import NIOCore
import NIOPosix

/// One connection to Redis on the worker's event loop. Commands are pipelined: replies
/// come back in request order, each to its callback. On a subscriber connection,
/// pushes (`message`, `subscribe`, ...) go to `onPush` instead.
final class RedisConnection {
    typealias Reply = (RedisValue) -> Void

    private let channel: any Channel
    private var waiting: [Reply] = []
    private var waitingStart = 0
    var onPush: ((RedisValue) -> Void)?
    var onClose: (() -> Void)?
    private var flushScheduled = false

    private init(channel: any Channel) {
        self.channel = channel
    }

    static func connect(to endpoint: RedisEndpoint, on eventLoop: any EventLoop) -> EventLoopFuture<NIOLoopBound<RedisConnection>> {
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.seconds(2))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RESPDecoder())
                    try channel.pipeline.syncOperations.addHandler(RESPEncoder())
                }
            }
        let connecting: EventLoopFuture<any Channel>
        switch endpoint.address {
        case .tcp(let host, let port): connecting = bootstrap.connect(host: host, port: port)
        case .unix(let path): connecting = bootstrap.connect(unixDomainSocketPath: path)
        }
        return connecting.flatMapThrowing { channel in
            let connection = RedisConnection(channel: channel)
            try channel.pipeline.syncOperations.addHandler(RedisReplyHandler(connection: connection))
            return NIOLoopBound(connection, eventLoop: channel.eventLoop)
        }
    }

    /// Sends a command; `reply` gets its answer (or `.error("connection lost")`).
    func send(_ arguments: [[UInt8]], reply: @escaping Reply) {
        guard channel.isActive else { return reply(.error("ERR connection lost")) }
        waiting.append(reply)
        write(arguments)
    }

    /// Sends a command whose answer arrives as a push (SUBSCRIBE, UNSUBSCRIBE).
    func sendForPush(_ arguments: [[UInt8]]) {
        guard channel.isActive else { return }
        write(arguments)
    }

    func close() {
        channel.close(promise: nil)
    }

    private func write(_ arguments: [[UInt8]]) {
        channel.write(arguments, promise: nil)
        guard !flushScheduled else { return }
        flushScheduled = true
        // One flush per tick: commands issued together go out in one write.
        channel.eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            channel.flush()
        }
    }

    fileprivate func received(_ value: RedisValue) {
        // A subscriber connection gets pushes interleaved with ordinary replies.
        if let onPush, case .array(let parts) = value, let kind = parts.first?.text,
           ["message", "subscribe", "unsubscribe", "pmessage", "psubscribe"].contains(kind) {
            return onPush(value)
        }
        guard waitingStart < waiting.count else { return }
        let reply = waiting[waitingStart]
        waitingStart += 1
        if waitingStart > 64 && waitingStart * 2 > waiting.count {
            waiting.removeFirst(waitingStart)
            waitingStart = 0
        }
        reply(value)
    }

    fileprivate func closed() {
        let pending = waiting[waitingStart...]
        waiting.removeAll()
        waitingStart = 0
        for reply in pending { reply(.error("ERR connection lost")) }
        onClose?()
        onClose = nil
    }
}

private final class RedisReplyHandler: ChannelInboundHandler {
    typealias InboundIn = RedisValue

    private let connection: RedisConnection

    init(connection: RedisConnection) {
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        connection.received(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.closed()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
