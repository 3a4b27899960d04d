import Testing
@testable import ChatEngine

/// Swift's own validator: the reference.
func referenceValid(_ bytes: [UInt8]) -> Bool { String(validating: bytes, as: UTF8.self) != nil }

func validWhole(_ bytes: [UInt8]) -> Bool { bytes.withUnsafeBytes { UTF8Validation.isValid($0) } }

/// Fed in pieces cut at `cuts` (offsets, ascending): false at the first piece that fails.
/// Returns the index of the piece that failed, or nil if all passed; and whether it ended
/// at a code point boundary.
func validPieces(_ bytes: [UInt8], cuts: [Int]) -> (failedPiece: Int?, complete: Bool) {
    var v = UTF8Validator()
    let bounds = [0] + cuts + [bytes.count]
    for k in 0..<(bounds.count - 1) {
        let ok = bytes.withUnsafeBytes { $0.baseAddress.map { v.validate($0 + bounds[k], count: bounds[k + 1] - bounds[k]) } ?? true }
        if !ok { return (k, false) }
    }
    return (nil, v.isComplete)
}

/// The offset of the first byte after which `bytes` can no longer be the start of any
/// UTF-8 string (nil if every prefix can), worked out with the reference: a prefix can be
/// completed if appending at most three continuation bytes makes it valid (80 fits every
/// range but E0's and F0's, A0 fits E0's, 90 F0's).
func firstHopelessByte(_ bytes: [UInt8]) -> Int? {
    let completions: [[UInt8]] = [[]] + [0x80, 0x90, 0xA0].flatMap { x in [[x], [x, 0x80], [x, 0x80, 0x80]] }
    for end in 1...max(bytes.count, 1) where end <= bytes.count {
        let prefix = Array(bytes[..<end])
        if !completions.contains(where: { referenceValid(prefix + $0) }) { return end - 1 }
    }
    return nil
}

/// A deterministic generator (Knuth's MMIX LCG, high bits folded down), so that a failure
/// can be replayed.
struct Replayable: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return state ^ (state >> 33)
    }
}

/// Autobahn's case 6.x byte strings (valid and not) and the boundaries of RFC 3629's table.
let utf8EdgeCases: [[UInt8]] = {
    var cases: [[UInt8]] = [
        [],
        Array("Hello-µ@ßöäüàá-UTF-8!!".utf8),                        // 6.2
        Array("κόσμε".utf8),                                          // 6.5
        [0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80, 0x65, 0x64, 0x69, 0x74, 0x65, 0x64],  // 6.3: a surrogate inside
        // 6.7 / 6.9: the first and last code point of each length.
        [0x00], [0xC2, 0x80], [0xE0, 0xA0, 0x80], [0xF0, 0x90, 0x80, 0x80],
        [0x7F], [0xDF, 0xBF], [0xEF, 0xBF, 0xBF], [0xF4, 0x8F, 0xBF, 0xBF],
        // 6.8 / 6.10: five and six byte forms, and the last four byte form past U+10FFFF.
        [0xF8, 0x88, 0x80, 0x80, 0x80], [0xFC, 0x84, 0x80, 0x80, 0x80, 0x80],
        [0xF7, 0xBF, 0xBF, 0xBF], [0xFB, 0xBF, 0xBF, 0xBF, 0xBF], [0xFD, 0xBF, 0xBF, 0xBF, 0xBF, 0xBF],
        // 6.11: other boundaries.
        [0xED, 0x9F, 0xBF], [0xEE, 0x80, 0x80], [0xEF, 0xBF, 0xBD], [0xF4, 0x90, 0x80, 0x80],
        // 6.16: impossible bytes.
        [0xFE], [0xFF], [0xFE, 0xFE, 0xFF, 0xFF],
        // 6.17: overlong '/'.
        [0xC0, 0xAF], [0xE0, 0x80, 0xAF], [0xF0, 0x80, 0x80, 0xAF], [0xF8, 0x80, 0x80, 0x80, 0xAF], [0xFC, 0x80, 0x80, 0x80, 0x80, 0xAF],
        // 6.18: the largest overlongs.
        [0xC1, 0xBF], [0xE0, 0x9F, 0xBF], [0xF0, 0x8F, 0xBF, 0xBF], [0xF8, 0x87, 0xBF, 0xBF, 0xBF], [0xFC, 0x83, 0xBF, 0xBF, 0xBF, 0xBF],
        // 6.19: overlong NUL.
        [0xC0, 0x80], [0xE0, 0x80, 0x80], [0xF0, 0x80, 0x80, 0x80], [0xF8, 0x80, 0x80, 0x80, 0x80], [0xFC, 0x80, 0x80, 0x80, 0x80, 0x80],
        // 6.20: single surrogates; 6.21: paired surrogates.
        [0xED, 0xA0, 0x80], [0xED, 0xAD, 0xBF], [0xED, 0xAE, 0x80], [0xED, 0xAF, 0xBF], [0xED, 0xB0, 0x80], [0xED, 0xBE, 0x80], [0xED, 0xBF, 0xBF],
        [0xED, 0xA0, 0x80, 0xED, 0xB0, 0x80], [0xED, 0xA0, 0x80, 0xED, 0xBF, 0xBF], [0xED, 0xAD, 0xBF, 0xED, 0xB0, 0x80],
        [0xED, 0xAE, 0x80, 0xED, 0xBF, 0xBF], [0xED, 0xAF, 0xBF, 0xED, 0xB0, 0x80], [0xED, 0xAF, 0xBF, 0xED, 0xBF, 0xBF],
        // 6.22: noncharacters are valid UTF-8.
        [0xEF, 0xBF, 0xBE], [0xEF, 0xBF, 0xBF], [0xF0, 0x9F, 0xBF, 0xBE], [0xF0, 0x9F, 0xBF, 0xBF], [0xF4, 0x8F, 0xBF, 0xBE],
        [0xEF, 0xB7, 0x90], [0xEF, 0xB7, 0xAF],
        // 6.14: sequences with the last byte missing; 6.15: all of them in a row.
        [0xC0], [0xE0, 0x80], [0xF0, 0x80, 0x80], [0xF8, 0x80, 0x80, 0x80], [0xFC, 0x80, 0x80, 0x80, 0x80],
        [0xDF], [0xEF, 0xBF], [0xF7, 0xBF, 0xBF], [0xFB, 0xBF, 0xBF, 0xBF], [0xFD, 0xBF, 0xBF, 0xBF, 0xBF],
        [0xC2], [0xE0, 0xA0], [0xF0, 0x90, 0x80], [0xF4, 0x8F, 0xBF], [0xE1], [0xF1, 0x80],
        [0xC0, 0xE0, 0x80, 0xF0, 0x80, 0x80, 0xF8, 0x80, 0x80, 0x80, 0xFC, 0x80, 0x80, 0x80, 0x80, 0xDF, 0xEF, 0xBF, 0xF7, 0xBF, 0xBF],
        // 6.12: unexpected continuation bytes.
        [0x80], [0xBF], [0x80, 0xBF], [0x80, 0xBF, 0x80], [0x80, 0xBF, 0x80, 0xBF], [0x80, 0xBF, 0x80, 0xBF, 0x80],
        Array(0x80...0xBF),
        // A valid sequence with one continuation too many.
        [0xC2, 0x80, 0x80], [0xE2, 0x82, 0xAC, 0xAC], [0x41, 0xF0, 0x9F, 0x98, 0x80, 0x80],
        // 6.6: "κόσμε" cut at every length is tested below; 6.4: fail fast with valid text first.
        Array("κόσμε".utf8) + [0xF4, 0x90, 0x80, 0x80] + Array("edited".utf8),
    ]
    // 6.13: lonely start characters, each followed by a space.
    for lead in UInt8(0xC0)...0xFD { cases.append([lead, 0x20]) }
    let kosme = Array("κόσμε".utf8)
    for n in 0...kosme.count { cases.append(Array(kosme.prefix(n))) }
    return cases
}()

@Suite struct UTF8ValidationTests {
    @Test func autobahnAndBoundaryCasesAgreeWithSwift() {
        for bytes in utf8EdgeCases {
            #expect(validWhole(bytes) == referenceValid(bytes), "\(bytes)")
        }
        // The list holds both kinds, so the check above can tell them apart.
        #expect(utf8EdgeCases.filter(referenceValid).count > 20)
        #expect(utf8EdgeCases.filter { !referenceValid($0) }.count > 100)
    }

    @Test func splitAnywhereGivesTheSameVerdict() {
        for bytes in utf8EdgeCases {
            let expected = referenceValid(bytes)
            for cut in 0...bytes.count {
                let r = validPieces(bytes, cuts: [cut])
                #expect((r.failedPiece == nil && r.complete) == expected, "\(bytes) cut at \(cut)")
            }
            let byByte = validPieces(bytes, cuts: bytes.indices.dropFirst().map { $0 })
            #expect((byByte.failedPiece == nil && byByte.complete) == expected, "\(bytes) byte by byte")
        }
    }

    /// Fed one byte at a time, a string fails at the very byte after which nothing could
    /// make it valid: not later (fail fast), not earlier (a valid prefix is accepted).
    @Test func failsAtTheFirstHopelessByte() {
        var checked = 0
        for bytes in utf8EdgeCases {
            let byByte = validPieces(bytes, cuts: bytes.indices.dropFirst().map { $0 })
            #expect(byByte.failedPiece == firstHopelessByte(bytes), "\(bytes)")
            if byByte.failedPiece != nil { checked += 1 }
        }
        #expect(checked > 100)
        // A truncated sequence is no failure until the message ends.
        let cut = validPieces([0x41, 0xF0, 0x9F, 0x98], cuts: [2])
        #expect(cut.failedPiece == nil && !cut.complete)
    }

    @Test func everyOneAndTwoByteString() {
        var valid = 0
        for a in 0...255 {
            #expect(validWhole([UInt8(a)]) == referenceValid([UInt8(a)]), "\(a)")
            for b in 0...255 {
                let bytes = [UInt8(a), UInt8(b)]
                let expected = referenceValid(bytes)
                #expect(validWhole(bytes) == expected, "\(bytes)")
                if expected { valid += 1 }
            }
        }
        #expect(valid == 128 * 128 + 30 * 64)  // two ASCII bytes, or one 2-byte sequence C2..DF
    }

    /// Every lead byte with continuation candidates at each range's edges, whole and cut.
    @Test func threeAndFourByteBoundaries() {
        let edges: [UInt8] = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
        for lead in UInt8(0x80)...0xFF {
            for b1 in edges {
                for b2 in edges {
                    let three = [lead, b1, b2]
                    #expect(validWhole(three) == referenceValid(three), "\(three)")
                    for b3 in edges {
                        let four = [lead, b1, b2, b3]
                        let expected = referenceValid(four)
                        #expect(validWhole(four) == expected, "\(four)")
                        let r = validPieces(four, cuts: [1, 3])
                        #expect((r.failedPiece == nil && r.complete) == expected, "\(four) cut")
                    }
                }
            }
        }
    }

    /// Random strings of four kinds, whole and in random pieces: valid text, valid text
    /// with one byte changed, random bytes, and ASCII runs (the 8- and 16-byte path) with
    /// a few non-ASCII bytes dropped in.
    @Test func randomStringsAgreeWithSwift() {
        var rng = Replayable(state: 0x5EED_0F_C4A7)
        let scalars: [ClosedRange<UInt32>] = [0x20...0x7E, 0x80...0x7FF, 0x800...0xD7FF, 0xE000...0xFFFF, 0x10000...0x10FFFF]
        var kinds = [0, 0]
        for round in 0..<4000 {
            var bytes: [UInt8] = []
            let length = Int.random(in: 0...80, using: &rng)
            switch round % 4 {
            case 0, 1:
                var s = String.UnicodeScalarView()
                for _ in 0..<length { s.append(Unicode.Scalar(UInt32.random(in: scalars.randomElement(using: &rng)!, using: &rng))!) }
                bytes = Array(String(s).utf8)
                if round % 4 == 1 && !bytes.isEmpty { bytes[Int.random(in: bytes.indices, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
            case 2:
                bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            default:
                bytes = (0..<(length * 2)).map { _ in UInt8.random(in: 0x20...0x7E, using: &rng) }
                for _ in 0..<Int.random(in: 0...3, using: &rng) where !bytes.isEmpty {
                    bytes[Int.random(in: bytes.indices, using: &rng)] = UInt8.random(in: 0x80...0xFF, using: &rng)
                }
            }
            let expected = referenceValid(bytes)
            kinds[expected ? 1 : 0] += 1
            #expect(validWhole(bytes) == expected, "\(bytes)")
            let cuts = (0..<Int.random(in: 0...4, using: &rng)).map { _ in Int.random(in: 0...bytes.count, using: &rng) }.sorted()
            let r = validPieces(bytes, cuts: cuts)
            #expect((r.failedPiece == nil && r.complete) == expected, "\(bytes) cut at \(cuts)")
        }
        #expect(kinds[0] > 500 && kinds[1] > 500)
    }

    /// One non-ASCII byte (or a bad one) at every offset of a long ASCII run, so that every
    /// branch of the 16- and 8-byte skipping meets it.
    @Test func nonASCIIAtEveryOffsetOfALongRun() {
        for length in [7, 8, 9, 15, 16, 17, 31, 32, 33, 64] {
            for offset in 0..<length {
                var good = [UInt8](repeating: 0x61, count: length)
                good.replaceSubrange(offset..<min(offset + 2, length), with: [0xC3, 0xA9])  // é
                #expect(validWhole(good) == referenceValid(good), "\(good)")
                var bad = [UInt8](repeating: 0x61, count: length)
                bad[offset] = 0x80
                #expect(!validWhole(bad), "stray continuation at \(offset) of \(length)")
                var high = [UInt8](repeating: 0x61, count: length)
                high[offset] = 0xFF
                #expect(!validWhole(high), "FF at \(offset) of \(length)")
            }
            #expect(validWhole([UInt8](repeating: 0x7F, count: length)))
        }
    }
}
