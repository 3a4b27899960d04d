import NIOCore

/// The relay link's framing, shared by both ends: a u32 length prefix around each
/// `RelayFrame`, with a maximum frame size so a peer cannot make us buffer without bound.
///
/// The prefix is written with the frame and read with it: NIOExtras' length-field decoder and
/// prepender cost a slice, an extra buffer, an extra iovec and two pipeline hops per frame,
/// and every join in a reconnect storm is two frames (perf, a storm of joins: 2.3 % of a
/// worker's samples in the prepender alone). Frames are read by `RelayLinkReader`.
public enum RelayCodec {
    /// Far above any real frame (a `joined` replay of 100 maximal messages); a longer
    /// length prefix means garbage and ends the link.
    public static let maximumFrameBytes = 64 * 1024 * 1024

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

/// Cuts length-prefixed frames out of a link's bytes as they arrive and decodes each; the
/// bytes of a frame not yet whole wait for the next call.
struct RelayFrameCutter {
    /// The start of a frame whose bytes are not all here yet.
    private var held: ByteBuffer?

    /// Hands every whole frame in what came so far to `deliver`, in order. Throws on a length
    /// over the maximum (before its bytes arrive) or a frame that does not decode; the link is
    /// done then, and what follows must not be fed.
    mutating func feed(_ bytes: ByteBuffer, _ deliver: (RelayFrame) -> Void) throws(RelayFrameError) {
        var bytes = bytes
        if var earlier = held {
            held = nil
            earlier.writeBuffer(&bytes)
            bytes = earlier
        }
        while let length = bytes.getInteger(at: bytes.readerIndex, as: UInt32.self) {
            guard length <= RelayCodec.maximumFrameBytes else {
                throw RelayFrameError("relay frame length \(length) over the maximum of \(RelayCodec.maximumFrameBytes) bytes")
            }
            guard bytes.readableBytes - 4 >= Int(length) else { break }
            bytes.moveReaderIndex(forwardBy: 4)
            var frame = bytes.readSlice(length: Int(length))!
            deliver(try RelayFrame.decode(&frame))
        }
        if bytes.readableBytes > 0 { held = bytes }
    }
}

/// The first handler of a relay link, at either end: reads the link's bytes and hands each
/// frame, decoded, straight to `deliver`. No ByteToMessageHandler in front of the link's own
/// handler, which boxed every frame into an NIOAny and cast it back out (perf, a storm of
/// URL joins: the two cost about 15 % of the relay's samples). A frame that cannot be read
/// goes on as an error to the next handler, the link's own, which closes the link; nothing
/// after it is read.
public final class RelayLinkReader: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer

    private var cutter = RelayFrameCutter()
    private var failed = false
    private let deliver: (RelayFrame) -> Void

    public init(deliver: @escaping (RelayFrame) -> Void) {
        self.deliver = deliver
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        do {
            try cutter.feed(unwrapInboundIn(data), deliver)
        } catch {
            failed = true
            context.fireErrorCaught(error)
        }
    }
}
