import ChatProtocol
import NIOCore
import NIOWebSocket

/// Server-to-client WebSocket frames as raw bytes (unmasked, FIN set). Building the
/// bytes ourselves lets one encoded frame be written to every member of a room as is.
public enum FrameBytes {
    public static func text(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        make(opcode: .text, payload: payload, allocator: allocator)
    }

    /// A server message as the text frame a WebSocket client gets: encoded behind room for
    /// the longest header, which is then written right in front of it (one buffer, no copy
    /// of the payload; every frame a session writes is made here).
    static func text(_ message: ServerMessage, allocator: ByteBufferAllocator) -> ByteBuffer {
        var frame = allocator.buffer(capacity: 192)
        frame.moveWriterIndex(forwardBy: maxHeader)
        frame.moveReaderIndex(forwardBy: maxHeader)
        message.encode(into: &frame)
        let length = frame.readableBytes
        let start = maxHeader - headerLength(length)
        frame.moveReaderIndex(to: start)
        writeHeader(opcode: .text, length: length, into: &frame, at: start)
        return frame
    }

    private static let maxHeader = 10

    private static func headerLength(_ payload: Int) -> Int {
        payload < 126 ? 2 : payload < 65_536 ? 4 : 10
    }

    private static func writeHeader(opcode: WebSocketOpcode, length: Int, into frame: inout ByteBuffer, at index: Int) {
        frame.setInteger(UInt8(0x80) | UInt8(webSocketOpcode: opcode), at: index)
        switch length {
        case ..<126:
            frame.setInteger(UInt8(length), at: index + 1)
        case ..<65_536:
            frame.setInteger(UInt8(126), at: index + 1)
            frame.setInteger(UInt16(length), at: index + 2)
        default:
            frame.setInteger(UInt8(127), at: index + 1)
            frame.setInteger(UInt64(length), at: index + 2)
        }
    }

    public static func binary(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        make(opcode: .binary, payload: payload, allocator: allocator)
    }

    public static func close(code: UInt16, allocator: ByteBufferAllocator) -> ByteBuffer {
        var payload = allocator.buffer(capacity: 2)
        payload.writeInteger(code)
        return make(opcode: .connectionClose, payload: payload, allocator: allocator)
    }

    public static func make(opcode: WebSocketOpcode, payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        let length = payload.readableBytes
        var frame = allocator.buffer(capacity: length + maxHeader)
        let header = headerLength(length)
        frame.moveWriterIndex(forwardBy: header)
        writeHeader(opcode: opcode, length: length, into: &frame, at: 0)
        var body = payload
        frame.writeBuffer(&body)
        return frame
    }
}
