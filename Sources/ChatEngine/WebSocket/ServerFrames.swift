/// Close status codes (RFC 6455 §7.4) the engine sends; the same numbers as
/// ChatProtocol's `CloseCode`, which the engine does not depend on.
public enum CloseStatus {
    public static let normal: UInt16 = 1000
    public static let protocolError: UInt16 = 1002
    /// Text that is not UTF-8 (RFC 6455 calls it "inconsistent data").
    public static let invalidPayload: UInt16 = 1007
    public static let tooBig: UInt16 = 1009

    /// Whether a close frame from a client may carry `code` (RFC 6455 §7.4.1 and §7.4.2:
    /// 1004-1006 and 1015 are reserved or never sent, 1012-2999 unassigned, 3000-4999
    /// registered or private). The same rule as the NIO path's
    /// `WebSocketHandler.isValidReceivedCloseCode`.
    @inlinable
    public static func isValidReceived(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1011, 3000...4999: true
        default: false
        }
    }
}

/// Server frames (unmasked, FIN set) written into a caller's buffer.
extension Frames {
    /// The longest server header (a 64-bit length): what to leave free before a payload
    /// that is to be framed where it lies.
    public static let maxServerHeaderLength = 10

    /// Writes the frame `opcode` + `payload` at `p`, which must have room for
    /// `serverHeaderLength(payload.count) + payload.count` bytes; returns its length.
    /// `payload` may lie anywhere but in those bytes (a pong can be built from the ping
    /// it answers, copied elsewhere).
    @inlinable
    @discardableResult
    public static func writeServerFrame(to p: UnsafeMutableRawPointer, opcode: UInt8, payload: UnsafeRawBufferPointer) -> Int {
        let head = writeServerHeader(to: p, opcode: opcode, payloadLength: payload.count)
        if let from = payload.baseAddress, payload.count > 0 { (p + head).copyMemory(from: from, byteCount: payload.count) }
        return head + payload.count
    }

    /// Writes a close frame carrying `code` (4 bytes) at `p`; returns 4.
    @inlinable
    @discardableResult
    public static func writeCloseFrame(to p: UnsafeMutableRawPointer, code: UInt16) -> Int {
        p.storeBytes(of: 0x80 | Opcode.close, as: UInt8.self)
        p.storeBytes(of: 2, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: UInt8(code >> 8), toByteOffset: 2, as: UInt8.self)
        p.storeBytes(of: UInt8(code & 0xFF), toByteOffset: 3, as: UInt8.self)
        return 4
    }
}
