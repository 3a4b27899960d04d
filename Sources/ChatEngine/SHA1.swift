/// SHA-1 and base64, only as far as RFC 6455's accept value needs them: the key is at most
/// a few dozen bytes, so the digest works on one stack block at a time and allocates nothing.
/// (swift-crypto is in the package graph only through jwt-kit; SwiftPM refuses a product of a
/// package that is not a direct dependency, and one hash is not worth a new top-level one.)
public enum SHA1 {
    /// The 20-byte digest of `bytes`, written to `out` (20 bytes).
    public static func digest(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutableRawPointer) {
        var h0: UInt32 = 0x6745_2301, h1: UInt32 = 0xEFCD_AB89, h2: UInt32 = 0x98BA_DCFE
        var h3: UInt32 = 0x1032_5476, h4: UInt32 = 0xC3D2_E1F0
        let n = bytes.count
        let bitLength = UInt64(n) &* 8
        // The padded message: n bytes, 0x80, zeros, the 64-bit length; a multiple of 64 bytes.
        let blocks = (n + 8) / 64 + 1
        withUnsafeTemporaryAllocation(of: UInt32.self, capacity: 80) { w in
            withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 64) { block in
                for b in 0..<blocks {
                    for i in 0..<64 {
                        let at = b * 64 + i
                        if at < n { block[i] = bytes[at] }
                        else if at == n { block[i] = 0x80 }
                        else if b == blocks - 1 && i >= 56 { block[i] = UInt8(truncatingIfNeeded: bitLength >> UInt64((63 - i) * 8)) }
                        else { block[i] = 0 }
                    }
                    for i in 0..<16 {
                        w[i] = UInt32(block[4 * i]) << 24 | UInt32(block[4 * i + 1]) << 16 | UInt32(block[4 * i + 2]) << 8 | UInt32(block[4 * i + 3])
                    }
                    for i in 16..<80 { w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1) }
                    var a = h0, bb = h1, c = h2, d = h3, e = h4
                    for i in 0..<80 {
                        let f: UInt32, k: UInt32
                        switch i {
                        case 0..<20: f = (bb & c) | (~bb & d); k = 0x5A82_7999
                        case 20..<40: f = bb ^ c ^ d; k = 0x6ED9_EBA1
                        case 40..<60: f = (bb & c) | (bb & d) | (c & d); k = 0x8F1B_BCDC
                        default: f = bb ^ c ^ d; k = 0xCA62_C1D6
                        }
                        let t = rotl(a, 5) &+ f &+ e &+ k &+ w[i]
                        e = d; d = c; c = rotl(bb, 30); bb = a; a = t
                    }
                    h0 = h0 &+ a; h1 = h1 &+ bb; h2 = h2 &+ c; h3 = h3 &+ d; h4 = h4 &+ e
                }
            }
        }
        out.storeBytes(of: h0.bigEndian, toByteOffset: 0, as: UInt32.self)
        out.storeBytes(of: h1.bigEndian, toByteOffset: 4, as: UInt32.self)
        out.storeBytes(of: h2.bigEndian, toByteOffset: 8, as: UInt32.self)
        out.storeBytes(of: h3.bigEndian, toByteOffset: 12, as: UInt32.self)
        out.storeBytes(of: h4.bigEndian, toByteOffset: 16, as: UInt32.self)
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
