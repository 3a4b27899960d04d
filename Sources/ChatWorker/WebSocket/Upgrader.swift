import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The WebSocket upgrade: NIO's upgrader checks the request and computes the handshake
/// answer; the pipeline it leaves behind is ours. We add NIO's frame decoder but not its
/// encoder, because every frame we send is pre-encoded bytes (one encoding per room
/// message, written to every member as is).
struct WebSocketUpgrader: HTTPServerProtocolUpgrader, Sendable {
    private let handshake: NIOWebSocketServerUpgrader
    private let maxFrameSize: @Sendable (HTTPRequestHead) -> Int
    private let configure: @Sendable (Channel, HTTPRequestHead) throws -> Void

    /// - Parameters:
    ///   - shouldUpgrade: extra response headers, or nil to refuse (the request then
    ///     reaches the HTTP handler).
    ///   - maxFrameSize: the largest frame the endpoint of a request takes.
    ///   - configure: adds the handlers above the frame decoder.
    init(
        maxFrameSize: @escaping @Sendable (HTTPRequestHead) -> Int,
        shouldUpgrade: @escaping @Sendable (Channel, HTTPRequestHead) -> EventLoopFuture<HTTPHeaders?>,
        configure: @escaping @Sendable (Channel, HTTPRequestHead) throws -> Void
    ) {
        handshake = NIOWebSocketServerUpgrader(
            automaticErrorHandling: false, shouldUpgrade: shouldUpgrade,
            upgradePipelineHandler: { channel, _ in channel.eventLoop.makeSucceededVoidFuture() })
        self.maxFrameSize = maxFrameSize
        self.configure = configure
    }

    var supportedProtocol: String { handshake.supportedProtocol }
    var requiredUpgradeHeaders: [String] { handshake.requiredUpgradeHeaders }

    func buildUpgradeResponse(channel: Channel, upgradeRequest: HTTPRequestHead, initialResponseHeaders: HTTPHeaders) -> EventLoopFuture<HTTPHeaders> {
        handshake.buildUpgradeResponse(channel: channel, upgradeRequest: upgradeRequest, initialResponseHeaders: initialResponseHeaders)
    }

    func upgrade(context: ChannelHandlerContext, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<Void> {
        let channel = context.channel
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: maxFrameSize(upgradeRequest))))
            try configure(channel, upgradeRequest)
        }
    }
}
