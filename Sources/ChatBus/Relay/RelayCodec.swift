import NIOCore
import NIOExtras

/// The relay link's framing, shared by both ends: a u32 length prefix around each
/// `RelayFrame`, with a maximum frame size so a peer cannot make us buffer without bound.
public enum RelayCodec {
    /// Far above any real frame (a `joined` replay of 100 maximal messages); a longer
    /// length prefix means garbage and ends the link.
    public static let maximumFrameBytes = 64 * 1024 * 1024

    public static func addHandlers(to pipeline: ChannelPipeline.SynchronousOperations) throws {
        try pipeline.addHandler(ByteToMessageHandler(
            LengthFieldBasedFrameDecoder(lengthFieldBitLength: .fourBytes), maximumBufferSize: maximumFrameBytes + 4))
        try pipeline.addHandler(LengthFieldPrepender(lengthFieldBitLength: .fourBytes))
        try pipeline.addHandler(RelayFrameDecoder())
    }

    /// Encodes a frame once; the same buffer can then be written to many links.
    public static func encode(_ frame: RelayFrame, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        frame.encode(into: &buffer)
        return buffer
    }
}

/// Turns length-delimited buffers into `RelayFrame`s; a frame that does not decode is a
/// fatal error for the link (reported through `errorCaught`), never for the process.
final class RelayFrameDecoder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = RelayFrame

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        do {
            context.fireChannelRead(wrapInboundOut(try RelayFrame.decode(&buffer)))
        } catch {
            context.fireErrorCaught(error)
        }
    }
}
