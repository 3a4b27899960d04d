/// WebSocket frames (RFC 6455 §5.2) worked on in place.
public struct FrameHeader: Equatable, Sendable {
    public var fin: Bool
    public var opcode: UInt8
    /// The mask key as it lies in the frame (four bytes, memory order); nil if unmasked.
    public var mask: UInt32?
    public var headerLength: Int
    public var payloadLength: Int
    public var frameLength: Int { headerLength + payloadLength }

    @inlinable
    public init(fin: Bool, opcode: UInt8, mask: UInt32?, headerLength: Int, payloadLength: Int) {
        self.fin = fin
        self.opcode = opcode
        self.mask = mask
        self.headerLength = headerLength
        self.payloadLength = payloadLength
    }
}

public enum FrameParse: Equatable, Sendable {
    case incomplete
    /// RSV bits set, a 64-bit length with its top bit set, or a control frame that is
    /// fragmented or longer than 125.
    case invalid
    case frame(FrameHeader)
}

public enum Opcode {
    public static let continuation: UInt8 = 0x0
    public static let text: UInt8 = 0x1
    public static let binary: UInt8 = 0x2
    public static let close: UInt8 = 0x8
    public static let ping: UInt8 = 0x9
    public static let pong: UInt8 = 0xA
}

public enum Frames {
    /// The header of the frame at `p` (`available` bytes), if it is all there.
    @inlinable
    public static func parseHeader(_ p: UnsafeRawPointer, _ available: Int) -> FrameParse {
        guard available >= 2 else { return .incomplete }
        let b0 = p.load(as: UInt8.self), b1 = p.load(fromByteOffset: 1, as: UInt8.self)
        if b0 & 0x70 != 0 { return .invalid }
        let opcode = b0 & 0x0F
        var length = Int(b1 & 0x7F)
        var head = 2
        if length == 126 {
            guard available >= 4 else { return .incomplete }
            length = Int(p.load(fromByteOffset: 2, as: UInt8.self)) << 8 | Int(p.load(fromByteOffset: 3, as: UInt8.self))
            head = 4
        } else if length == 127 {
            guard available >= 10 else { return .incomplete }
            var l: UInt64 = 0
            for k in 2..<10 { l = l << 8 | UInt64(p.load(fromByteOffset: k, as: UInt8.self)) }
            if l >> 63 != 0 { return .invalid }
            length = Int(l)
            head = 10
        }
        if opcode & 0x08 != 0 && (b0 & 0x80 == 0 || length > 125) { return .invalid }
        var mask: UInt32? = nil
        if b1 & 0x80 != 0 {
            guard available >= head + 4 else { return .incomplete }
            mask = p.loadUnaligned(fromByteOffset: head, as: UInt32.self)
            head += 4
        }
        return .frame(FrameHeader(fin: b0 & 0x80 != 0, opcode: opcode, mask: mask, headerLength: head, payloadLength: length))
    }

    /// XORs `count` bytes at `p` with the mask key (memory order, starting at key byte 0).
    @inlinable
    public static func unmask(_ p: UnsafeMutableRawPointer, count: Int, key: UInt32) {
        let k64 = UInt64(key) | UInt64(key) << 32
        var i = 0
        while i + 8 <= count {
            let v = p.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            p.storeBytes(of: v ^ k64, toByteOffset: i, as: UInt64.self)
            i += 8
        }
        var kk = k64  // little-endian: the low byte is the key byte to use next
        while i < count {
            let v = p.load(fromByteOffset: i, as: UInt8.self)
            p.storeBytes(of: v ^ UInt8(truncatingIfNeeded: kk), toByteOffset: i, as: UInt8.self)
            kk >>= 8
            i += 1
        }
    }

    /// The mask key for the byte `phase` bytes into a masked run: the key as it lies,
    /// turned so that its first memory byte is key byte `phase % 4`. Unmasking a payload
    /// in pieces calls `unmask` with this for each piece after the first.
    @inlinable
    public static func maskKey(_ key: UInt32, advancedBy phase: Int) -> UInt32 {
        let bits = UInt32((phase & 3) * 8)
        guard bits != 0 else { return key }
        #if _endian(little)
        return key >> bits | key << (32 - bits)
        #else
        return key << bits | key >> (32 - bits)
        #endif
    }

    /// A server (unmasked) header's length for a payload of `n` bytes: 2, 4 or 10.
    @inlinable
    public static func serverHeaderLength(_ n: Int) -> Int { n < 126 ? 2 : n < 65_536 ? 4 : 10 }

    /// Writes a final, unmasked header; returns its length.
    @inlinable
    @discardableResult
    public static func writeServerHeader(to p: UnsafeMutableRawPointer, opcode: UInt8, payloadLength n: Int) -> Int {
        p.storeBytes(of: 0x80 | opcode, as: UInt8.self)
        if n < 126 {
            p.storeBytes(of: UInt8(n), toByteOffset: 1, as: UInt8.self)
            return 2
        } else if n < 65_536 {
            p.storeBytes(of: 126, toByteOffset: 1, as: UInt8.self)
            p.storeBytes(of: UInt16(n).bigEndian, toByteOffset: 2, as: UInt16.self)
            return 4
        }
        p.storeBytes(of: 127, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: UInt64(n).bigEndian, toByteOffset: 2, as: UInt64.self)
        return 10
    }

    /// Turns the masked client frame at `p` into the server frame of the same opcode and
    /// payload, in place: the payload is unmasked where it lies and the shorter server
    /// header (by the four mask bytes at least) written just before it. Returns the server
    /// frame's offset from `p` and its length.
    @inlinable
    public static func reframeInPlace(_ p: UnsafeMutableRawPointer, _ h: FrameHeader) -> (offset: Int, length: Int) {
        let payload = p + h.headerLength
        if let key = h.mask { unmask(payload, count: h.payloadLength, key: key) }
        let sh = serverHeaderLength(h.payloadLength)
        let offset = h.headerLength - sh
        writeServerHeader(to: p + offset, opcode: h.opcode, payloadLength: h.payloadLength)
        return (offset, sh + h.payloadLength)
    }
}
