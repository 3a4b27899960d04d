/// An incremental UTF-8 validator (RFC 3629, as RFC 6455 §8.1 requires of text messages).
///
/// The state is carried across calls, so a code point split between two fragments (or two
/// reads) is fine, and an invalid sequence is reported by the call that brings its first
/// wrong byte: a lead byte that cannot start a sequence, or a continuation byte outside the
/// range its position allows. That is the earliest point at which any validator can know
/// (Autobahn 6.4.x, "fail fast"): every prefix this accepts can still be completed.
///
/// Rejected: stray continuation bytes (80..BF as a lead), overlong forms (C0, C1, E0 80..9F,
/// F0 80..8F), surrogates (ED A0..BF), code points past U+10FFFF (F4 90..BF, F5..FF), and,
/// through `isComplete`, a sequence cut off by the end of the message.
///
/// Three bytes of state; ASCII is skipped 16 and 8 bytes at a time.
public struct UTF8Validator: Equatable, Sendable {
    /// Continuation bytes still expected (0 to 3).
    @usableFromInline var pending: UInt8 = 0
    /// The range the next continuation byte must lie in (narrower than 80..BF only for the
    /// byte after E0, ED, F0 and F4).
    @usableFromInline var low: UInt8 = 0x80
    @usableFromInline var high: UInt8 = 0xBF

    @inlinable
    public init() {}

    /// True at a code point boundary: a message may end here.
    @inlinable
    public var isComplete: Bool { pending == 0 }

    /// Validates `count` more bytes at `p`; false as soon as they cannot be UTF-8 whatever
    /// follows (the state is then meaningless).
    @inlinable
    public mutating func validate(_ p: UnsafeRawPointer, count: Int) -> Bool {
        var i = 0
        // The rest of a sequence an earlier call began.
        guard takePending(p, &i, count) else { return false }
        while i < count {
            let lead = p.load(fromByteOffset: i, as: UInt8.self)
            if lead < 0x80 {
                i = Self.skipASCII(p, from: i + 1, count: count)
                continue
            }
            let (n, lo, hi) = Self.sequence(lead)
            guard n > 0 else { return false }
            guard count - i > n else {
                // Cut off by the end of these bytes: check what is here, carry the rest.
                pending = UInt8(n)
                low = lo
                high = hi
                i += 1
                return takePending(p, &i, count)
            }
            // The whole sequence is here.
            let b1 = p.load(fromByteOffset: i + 1, as: UInt8.self)
            guard b1 >= lo && b1 <= hi else { return false }
            for k in 2..<(n + 1) where !Self.isContinuation(p.load(fromByteOffset: i + k, as: UInt8.self)) { return false }
            i += n + 1
        }
        return true
    }

    /// Takes the continuation bytes the state expects from `i` on (up to `count`); false
    /// at one out of its range.
    @inlinable @inline(__always)
    mutating func takePending(_ p: UnsafeRawPointer, _ i: inout Int, _ count: Int) -> Bool {
        while pending > 0 && i < count {
            let b = p.load(fromByteOffset: i, as: UInt8.self)
            guard b >= low && b <= high else { return false }
            low = 0x80
            high = 0xBF
            pending -= 1
            i += 1
        }
        return true
    }

    /// The first non-ASCII byte's offset at or after `i`, or `count`.
    @inlinable @inline(__always)
    static func skipASCII(_ p: UnsafeRawPointer, from start: Int, count: Int) -> Int {
        let high: UInt64 = 0x8080_8080_8080_8080
        var i = start
        while i + 16 <= count {
            let a = p.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            let b = p.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
            if (a | b) & high != 0 { break }
            i += 16
        }
        while i + 8 <= count {
            if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) & high != 0 { break }
            i += 8
        }
        while i < count && p.load(fromByteOffset: i, as: UInt8.self) < 0x80 { i += 1 }
        return i
    }

    @inlinable @inline(__always)
    static func isContinuation(_ b: UInt8) -> Bool { b & 0xC0 == 0x80 }

    /// For a lead byte 80..FF: the continuation bytes it needs and the range of the first
    /// (n = 0: it cannot lead a sequence).
    @inlinable @inline(__always)
    static func sequence(_ lead: UInt8) -> (n: Int, low: UInt8, high: UInt8) {
        switch lead {
        case 0xC2...0xDF: (1, 0x80, 0xBF)
        case 0xE0: (2, 0xA0, 0xBF)  // no overlong 3-byte forms
        case 0xED: (2, 0x80, 0x9F)  // no surrogates D800..DFFF
        case 0xE1...0xEF: (2, 0x80, 0xBF)
        case 0xF0: (3, 0x90, 0xBF)  // no overlong 4-byte forms
        case 0xF1...0xF3: (3, 0x80, 0xBF)
        case 0xF4: (3, 0x80, 0x8F)  // nothing past U+10FFFF
        default: (0, 0, 0)  // 80..BF (a stray continuation), C0, C1 (overlong), F5..FF
        }
    }
}

public enum UTF8Validation {
    /// True if the `count` bytes at `p` are, by themselves, a complete UTF-8 string.
    @inlinable
    public static func isValid(_ p: UnsafeRawPointer, count: Int) -> Bool {
        var v = UTF8Validator()
        return v.validate(p, count: count) && v.isComplete
    }

    @inlinable
    public static func isValid(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let p = bytes.baseAddress else { return true }
        return isValid(p, count: bytes.count)
    }
}
