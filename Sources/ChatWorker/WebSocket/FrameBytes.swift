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
        var header: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &header) { out in
            let count = writeHeader(opcode: opcode, length: length, into: out)
            frame.setBytes(UnsafeRawBufferPointer(rebasing: out[..<count]), at: index)
        }
    }

    /// A frame's header at the start of `out` (room for `headerLength`); answers its length.
    static func writeHeader(opcode: WebSocketOpcode, length: Int, into out: UnsafeMutableRawBufferPointer) -> Int {
        out[0] = UInt8(0x80) | UInt8(webSocketOpcode: opcode)
        switch length {
        case ..<126:
            out[1] = UInt8(length)
            return 2
        case ..<65_536:
            out[1] = 126
            out.storeBytes(of: UInt16(length).bigEndian, toByteOffset: 2, as: UInt16.self)
            return 4
        default:
            out[1] = 127
            out.storeBytes(of: UInt64(length).bigEndian, toByteOffset: 2, as: UInt64.self)
            return 10
        }
    }

    /// `hello` as a text frame at the start of `out`; answers its length, or nil if `out`
    /// is too short.
    static func writeHello(_ hello: HelloText, into out: UnsafeMutableRawBufferPointer) -> Int? {
        let header = headerLength(hello.length)
        guard out.count >= header + hello.length else { return nil }
        _ = writeHeader(opcode: .text, length: hello.length, into: out)
        return hello.write(into: UnsafeMutableRawBufferPointer(rebasing: out[header...])).map { header + $0 }
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
