import ChatProtocol
import NIOCore

/// One client's conversation: turns requests into actions on the worker's rooms and
/// writes the answers. Lives on the worker's single event loop, like everything it touches.
final class SessionHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketMessage
    typealias OutboundOut = ByteBuffer

    let user: String
    let connectionID: String
    private let worker: Worker
    private var context: ChannelHandlerContext?
    private var saidGoodbye = false

    init(user: String, connectionID: String, worker: Worker) {
        self.user = user
        self.connectionID = connectionID
        self.worker = worker
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        worker.register(self)
        send(.hello(user: user, conn: connectionID, heartbeatSeconds: worker.settings.heartbeatSeconds))
        flush()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        worker.unregister(self)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        worker.unregister(self)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        worker.counters.messagesIn += 1
        switch unwrapInboundIn(data) {
        case .binary:
            send(.error(ProtocolError(.badFrame, "frames must be text holding one JSON object")))
        case .text(let text):
            switch ClientMessage.decode(text, maxTextBytes: worker.settings.maxTextBytes) {
            case .success(let request): handle(request)
            case .failure(let error): send(.error(error))
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    private func handle(_ request: ClientMessage) {
        switch request {
        case .ping(let ref):
            send(.pong(ref: ref))
        default:
            send(.error(ProtocolError(.internal, "not implemented yet", ref: request.ref)))
        }
    }

    // MARK: output

    /// Encodes and queues one frame; the caller flushes.
    func send(_ message: ServerMessage) {
        guard let context else { return }
        let allocator = context.channel.allocator
        write(FrameBytes.text(message.encoded(allocator), allocator: allocator))
    }

    /// Queues an already framed message (the same bytes go to every member of a room).
    func write(_ frame: ByteBuffer) {
        guard let context else { return }
        worker.counters.messagesOut += 1
        context.write(wrapOutboundOut(frame), promise: nil)
    }

    func flush() {
        context?.flush()
    }

    /// Sends `bye` and starts the close handshake with the matching close code.
    func sayGoodbye(_ reason: ByeReason, retryMs: Int) {
        guard let context, !saidGoodbye else { return }
        saidGoodbye = true
        send(.bye(reason: reason, retryMs: retryMs))
        flush()
        context.triggerUserOutboundEvent(WebSocketCloseRequest(code: CloseCode.forBye(reason)), promise: nil)
    }
}
