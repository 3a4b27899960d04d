import NIOCore

/// The last stage of `/echo` (conformance testing only, `conformance.echo`): every
/// message goes back as it came, text as text and binary as binary. Everything below it
/// is the same pipeline `/ws` uses.
final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketMessage
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let allocator = context.channel.allocator
        switch unwrapInboundIn(data) {
        case .text(let payload):
            context.write(wrapOutboundOut(FrameBytes.text(payload, allocator: allocator)), promise: nil)
        case .binary(let payload):
            context.write(wrapOutboundOut(FrameBytes.binary(payload, allocator: allocator)), promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }
}
