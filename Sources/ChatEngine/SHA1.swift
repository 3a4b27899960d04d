import CChatEngine

/// SHA-1 and base64, only as far as RFC 6455's accept value needs them: the key is at most
/// a few dozen bytes, so the digest works on one stack block at a time and allocates nothing.
/// (swift-crypto is in the package graph only through jwt-kit; SwiftPM refuses a product of a
/// package that is not a direct dependency, and one hash is not worth a new top-level one.)
public enum SHA1 {
    /// Whether digests use the CPU's SHA instructions (x86-64's SHA-NI, in CChatEngine): a
    /// handshake's two blocks cost 0.74 µs in the rounds below on the Intel Xeon, a sixth of
    /// that with the instructions.
    public static let hardware = chatengine_sha1_hardware() != 0

    /// The 20-byte digest of `bytes`, written to `out` (20 bytes).
    public static func digest(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutableRawPointer) {
        digest(bytes, into: out, hardware: hardware)
    }

    /// With `hardware` false, the portable rounds below whatever the CPU has (for tests).
    static func digest(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutableRawPointer, hardware: Bool) {
        var state: (UInt32, UInt32, UInt32, UInt32, UInt32) = (0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0)
        let n = bytes.count
        let whole = n / 64
        if whole > 0 { compress(&state, UnsafeRawPointer(bytes.baseAddress!), blocks: whole, hardware: hardware) }
        // The tail: the rest, 0x80, zeros and the 64-bit bit length, in one or two blocks.
        withUnsafeTemporaryAllocation(byteCount: 128, alignment: 8) { tail in
            let base = tail.baseAddress!
            base.initializeMemory(as: UInt8.self, repeating: 0, count: 128)
            let rest = n - whole * 64
            if rest > 0 { base.copyMemory(from: bytes.baseAddress! + whole * 64, byteCount: rest) }
            base.storeBytes(of: 0x80, toByteOffset: rest, as: UInt8.self)
            let length = rest + 1 + 8 <= 64 ? 64 : 128
            base.storeBytes(of: (UInt64(n) &* 8).bigEndian, toByteOffset: length - 8, as: UInt64.self)
            compress(&state, UnsafeRawPointer(base), blocks: length / 64, hardware: hardware)
        }
        out.storeBytes(of: state.0.bigEndian, toByteOffset: 0, as: UInt32.self)
        out.storeBytes(of: state.1.bigEndian, toByteOffset: 4, as: UInt32.self)
        out.storeBytes(of: state.2.bigEndian, toByteOffset: 8, as: UInt32.self)
        out.storeBytes(of: state.3.bigEndian, toByteOffset: 12, as: UInt32.self)
        out.storeBytes(of: state.4.bigEndian, toByteOffset: 16, as: UInt32.self)
    }

    @inline(__always)
    private static func compress(_ state: inout (UInt32, UInt32, UInt32, UInt32, UInt32), _ blocks: UnsafeRawPointer, blocks count: Int, hardware: Bool) {
        if hardware {
            let done = withUnsafeMutablePointer(to: &state) {
                $0.withMemoryRebound(to: UInt32.self, capacity: 5) { chatengine_sha1_blocks($0, blocks, UInt(count)) }
            }
            if done != 0 { return }
        }
        for b in 0..<count { compress(&state, blocks + b * 64) }
    }

    /// One 64-byte block into the state. The four kinds of round are four loops (a switch
    /// in one loop of 80 cost a branch a round).
    @inline(__always)
    private static func compress(_ state: inout (UInt32, UInt32, UInt32, UInt32, UInt32), _ block: UnsafeRawPointer) {
        withUnsafeTemporaryAllocation(of: UInt32.self, capacity: 80) { w in
            for i in 0..<16 { w[i] = UInt32(bigEndian: block.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)) }
            for i in 16..<80 { w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1) }
            var (a, b, c, d, e) = state
            for i in 0..<20 {
                let t = rotl(a, 5) &+ ((b & c) | (~b & d)) &+ e &+ 0x5A82_7999 &+ w[i]
                e = d; d = c; c = rotl(b, 30); b = a; a = t
            }
            for i in 20..<40 {
                let t = rotl(a, 5) &+ (b ^ c ^ d) &+ e &+ 0x6ED9_EBA1 &+ w[i]
                e = d; d = c; c = rotl(b, 30); b = a; a = t
            }
            for i in 40..<60 {
                let t = rotl(a, 5) &+ ((b & c) | (b & d) | (c & d)) &+ e &+ 0x8F1B_BCDC &+ w[i]
                e = d; d = c; c = rotl(b, 30); b = a; a = t
            }
            for i in 60..<80 {
                let t = rotl(a, 5) &+ (b ^ c ^ d) &+ e &+ 0xCA62_C1D6 &+ w[i]
                e = d; d = c; c = rotl(b, 30); b = a; a = t
            }
            state = (state.0 &+ a, state.1 &+ b, state.2 &+ c, state.3 &+ d, state.4 &+ e)
        }
    }

    @inline(__always) static func rotl(_ x: UInt32, _ n: UInt32) -> UInt32 { x << n | x >> (32 - n) }
}

public enum WebSocketAccept {
    static let guid: StaticString = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    static let alphabet: StaticString = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    /// Writes the 28-byte Sec-WebSocket-Accept value for `key` to `out`; returns 28.
    /// `key` is at most 64 bytes (a valid key is 24).
    public static func write(key: UnsafeRawBufferPointer, to out: UnsafeMutableRawPointer) -> Int {
        let g = UnsafeRawBufferPointer(start: guid.utf8Start, count: guid.utf8CodeUnitCount)
        let total = key.count + g.count
        return withUnsafeTemporaryAllocation(byteCount: total + 20, alignment: 8) { tmp in
            let base = tmp.baseAddress!
            base.copyMemory(from: key.baseAddress!, byteCount: key.count)
            (base + key.count).copyMemory(from: g.baseAddress!, byteCount: g.count)
            let digest = base + total
            SHA1.digest(UnsafeRawBufferPointer(start: base, count: total), into: digest)
            return base64(UnsafeRawBufferPointer(start: digest, count: 20), to: out)
        }
    }

    /// Standard base64 with padding; returns the bytes written.
    public static func base64(_ src: UnsafeRawBufferPointer, to out: UnsafeMutableRawPointer) -> Int {
        let a = alphabet.utf8Start
        var o = 0, i = 0
        let n = src.count
        while i + 3 <= n {
            let v = UInt32(src[i]) << 16 | UInt32(src[i + 1]) << 8 | UInt32(src[i + 2])
            for s in 0..<4 { out.storeBytes(of: a[Int(v >> UInt32(18 - 6 * s) & 63)], toByteOffset: o + s, as: UInt8.self) }
            o += 4; i += 3
        }
        let rest = n - i
        if rest > 0 {
            let v = UInt32(src[i]) << 16 | (rest == 2 ? UInt32(src[i + 1]) << 8 : 0)
            out.storeBytes(of: a[Int(v >> 18 & 63)], toByteOffset: o, as: UInt8.self)
            out.storeBytes(of: a[Int(v >> 12 & 63)], toByteOffset: o + 1, as: UInt8.self)
            out.storeBytes(of: rest == 2 ? a[Int(v >> 6 & 63)] : UInt8(ascii: "="), toByteOffset: o + 2, as: UInt8.self)
            out.storeBytes(of: UInt8(ascii: "="), toByteOffset: o + 3, as: UInt8.self)
            o += 4
        }
        return o
    }
}
