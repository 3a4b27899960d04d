import NIOCore

/// The relay link's framing, shared by both ends: a u32 length prefix around each
/// `RelayFrame`, with a maximum frame size so a peer cannot make us buffer without bound.
///
/// The prefix is written with the frame and read with it, in one handler: NIOExtras'
/// length-field decoder and prepender cost a slice, an extra buffer, an extra iovec and two
/// pipeline hops per frame, and every join in a reconnect storm is two frames (perf, a storm
/// of joins: 2.3 % of a worker's samples in the prepender alone).
public enum RelayCodec {
    /// Far above any real frame (a `joined` replay of 100 maximal messages); a longer
    /// length prefix means garbage and ends the link.
    public static let maximumFrameBytes = 64 * 1024 * 1024

    public static func addHandlers(to pipeline: ChannelPipeline.SynchronousOperations) throws {
        try pipeline.addHandler(ByteToMessageHandler(RelayFrameDecoder(), maximumBufferSize: maximumFrameBytes + 4))
    }

    /// Encodes a frame once, length prefix included; the same buffer can then be written to
    /// many links.
    public static func encode(_ frame: RelayFrame, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        append(frame, to: &buffer)
        return buffer
    }

    /// Appends a frame, length prefix included, to what a link will write at the end of its
    /// tick: one buffer and one pipeline write per tick, not per frame.
    public static func append(_ frame: RelayFrame, to buffer: inout ByteBuffer) {
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        frame.encode(into: &buffer)
        buffer.setInteger(UInt32(buffer.writerIndex - lengthIndex - 4), at: lengthIndex)
    }
}

/// Cuts length-prefixed frames out of the link's bytes and decodes each into a
/// `RelayFrame`; a length over the maximum or a frame that does not decode is a fatal error
/// for the link (reported through `errorCaught`), never for the process.
struct RelayFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = RelayFrame

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length <= RelayCodec.maximumFrameBytes else {
            throw RelayFrameError("relay frame length \(length) over the maximum of \(RelayCodec.maximumFrameBytes) bytes")
        }
        guard buffer.readableBytes - 4 >= Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        var frame = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(wrapInboundOut(try RelayFrame.decode(&frame)))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}
