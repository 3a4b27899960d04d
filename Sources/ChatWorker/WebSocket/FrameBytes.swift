import ChatProtocol
import NIOCore
import NIOWebSocket

/// Server-to-client WebSocket frames as raw bytes (unmasked, FIN set). Building the
/// bytes ourselves lets one encoded frame be written to every member of a room as is.
public enum FrameBytes {
    public static func text(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        make(opcode: .text, payload: payload, allocator: allocator)
    }

    /// A server message as the text frame a WebSocket client gets.
    static func text(_ message: ServerMessage, allocator: ByteBufferAllocator) -> ByteBuffer {
        text(message.encoded(allocator), allocator: allocator)
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
        var frame = allocator.buffer(capacity: length + 10)
        frame.writeInteger(UInt8(0x80) | UInt8(webSocketOpcode: opcode))
        switch length {
        case ..<126:
            frame.writeInteger(UInt8(length))
        case ..<65_536:
            frame.writeInteger(UInt8(126))
            frame.writeInteger(UInt16(length))
        default:
            frame.writeInteger(UInt8(127))
            frame.writeInteger(UInt64(length))
        }
        var body = payload
        frame.writeBuffer(&body)
        return frame
    }
}
