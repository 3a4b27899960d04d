import Foundation
import NIOCore
import Testing
@testable import ChatProtocol

/// How requests were read before JSONReader: JSONDecoder with the cascade of single-value
/// decodes `JSONValue.init(from:)` had. JSONReader must give what this gives.
private struct DecoderReading: Decodable {
    let value: JSONValue

    init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            value = .null
        } else if let bool = try? container.decode(Bool.self) {
            value = .bool(bool)
        } else if let number = try? container.decode(Double.self) {
            value = .number(number)
        } else if let string = try? container.decode(String.self) {
            value = .string(string)
        } else if let elements = try? container.decode([DecoderReading].self) {
            value = .array(elements.map(\.value))
        } else {
            value = .object(try container.decode([String: DecoderReading].self).mapValues(\.value))
        }
    }
}

private func decoderValue(_ bytes: [UInt8]) -> JSONValue? {
    try? JSONDecoder().decode(DecoderReading.self, from: Data(bytes)).value
}

private func readerValue(_ bytes: [UInt8]) -> JSONValue? {
    JSONReader.read(ByteBuffer(bytes: bytes))
}

/// Equal to the bit, which JSONValue's `==` is not: numbers by bit pattern (-0 is not 0),
/// strings and keys by their UTF-8 ("é" is not "e\u{301}").
private func identical(_ left: JSONValue?, _ right: JSONValue?) -> Bool {
    switch (left, right) {
    case (nil, nil), (.null?, .null?):
        return true
    case (.bool(let a)?, .bool(let b)?):
        return a == b
    case (.number(let a)?, .number(let b)?):
        return a.bitPattern == b.bitPattern
    case (.string(let a)?, .string(let b)?):
        return a.utf8.elementsEqual(b.utf8)
    case (.array(let a)?, .array(let b)?):
        return a.count == b.count && zip(a, b).allSatisfy { identical($0, $1) }
    case (.object(let a)?, .object(let b)?):
        return a.count == b.count && a.allSatisfy { key, value in
            guard let index = b.index(forKey: key) else { return false }
            return b[index].key.utf8.elementsEqual(key.utf8) && identical(value, b[index].value)
        }
    default:
        return false
    }
}

/// The input, readable in a failure message.
private func shown(_ bytes: [UInt8]) -> String {
    let text = String(decoding: bytes.prefix(120), as: UTF8.self).debugDescription
    let hex = bytes.prefix(60).map { String($0, radix: 16) }.joined(separator: " ")
    return "\(text) [\(hex)]\(bytes.count > 60 ? " … \(bytes.count) bytes" : "")"
}

private enum Outcome {
    case accepted
    case rejected
}

/// Expects JSONDecoder to judge `bytes` as `outcome` (what it did when these tests were
/// written) and JSONReader to give exactly what JSONDecoder gives.
private func expectSameAsDecoder(_ bytes: [UInt8], _ outcome: Outcome, sourceLocation: SourceLocation = #_sourceLocation) {
    let reference = decoderValue(bytes)
    let read = readerValue(bytes)
    #expect((reference == nil ? Outcome.rejected : .accepted) == outcome,
            "JSONDecoder: \(shown(bytes)) gives \(String(describing: reference))", sourceLocation: sourceLocation)
    #expect(identical(read, reference),
            "\(shown(bytes)): JSONReader \(String(describing: read)), JSONDecoder \(String(describing: reference))",
            sourceLocation: sourceLocation)
}

private func expectSameAsDecoder(_ text: String, _ outcome: Outcome, sourceLocation: SourceLocation = #_sourceLocation) {
    expectSameAsDecoder(Array(text.utf8), outcome, sourceLocation: sourceLocation)
}

private func nested(_ depth: Int, open: String = "[", close: String = "]", inner: String = "") -> String {
    String(repeating: open, count: depth) + inner + String(repeating: close, count: depth)
}

// MARK: - Edge cases, each as JSONDecoder judges it

@Suite struct JSONReaderEdgeCaseTests {
    @Test func duplicateKeysFirstWinsAndLaterValuesAreOnlyScanned() {
        expectSameAsDecoder(#"{"a":1,"a":2}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"b":{"x":1},"a":"z"}"#, .accepted)
        expectSameAsDecoder(#"{"a":{"b":1},"a":{"b":2,"b":3}}"#, .accepted)
        expectSameAsDecoder(#"{"é":1,"e\u0301":2}"#, .accepted)
        expectSameAsDecoder(#"{"e\u0301":1,"\u00e9":2}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"\u0061":2}"#, .accepted)
        // JSONDecoder never decodes a repeated key's value, only scans it: what only
        // decoding refuses passes there (absurd, matched on purpose).
        expectSameAsDecoder(#"{"a":1,"a":01}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"a":-}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"a":1e400}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"a":"\uD800"}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"a":"\q"}"#, .accepted)
        expectSameAsDecoder(#"{"a":1,"a":[01,"\q",{"\x":-.}]}"#, .accepted)
        expectSameAsDecoder([UInt8](#"{"a":1,"a":"#.utf8) + [0x22, 0xFF, 0x01, 0x0A, 0x22, 0x7D], .accepted)
        expectSameAsDecoder(#"{"a":1,"a":[1,]}"#, .accepted)
        // What the scanner checks still counts there: structure, literals, \u length, depth.
        expectSameAsDecoder(#"{"a":1,"a":tru}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":[,]}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":"\u12"}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":"\u12"}"}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":"\"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":+1}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":"# + nested(511) + "}", .accepted)
        expectSameAsDecoder(#"{"a":1,"a":"# + nested(512) + "}", .rejected)
        // Every key is decoded, repeated or not.
        expectSameAsDecoder(#"{"a":1,"\q":1}"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"a":{"\q":1}}"#, .accepted)
        expectSameAsDecoder([UInt8](#"{"a":1,""#.utf8) + [0xFF, 0x22, 0x3A, 0x31, 0x7D], .rejected)
    }

    @Test func whitespaceGarbageEmptyAndScalars() {
        expectSameAsDecoder(" \t\r\n{\"a\":1} \t\r\n", .accepted)
        expectSameAsDecoder("{ \"a\" : [ 1 , 2 ] , \"b\" : { } }", .accepted)
        expectSameAsDecoder([0x0C, 0x7B, 0x7D], .rejected)        // form feed
        expectSameAsDecoder([0x0B, 0x7B, 0x7D], .rejected)        // vertical tab
        expectSameAsDecoder([0xC2, 0xA0, 0x7B, 0x7D], .rejected)  // NBSP
        expectSameAsDecoder([0x7B, 0x7D, 0x00], .rejected)
        expectSameAsDecoder("", .rejected)
        expectSameAsDecoder(" ", .rejected)
        expectSameAsDecoder("{}x", .rejected)
        expectSameAsDecoder("{} {}", .rejected)
        expectSameAsDecoder("{},", .rejected)
        expectSameAsDecoder("[1]]", .rejected)
        expectSameAsDecoder("[1}", .rejected)
        expectSameAsDecoder(#"{"a":1]"#, .rejected)
        expectSameAsDecoder("1", .accepted)
        expectSameAsDecoder(" 1 ", .accepted)
        expectSameAsDecoder(#""s""#, .accepted)
        expectSameAsDecoder("[]", .accepted)
        expectSameAsDecoder("[ ]", .accepted)
        expectSameAsDecoder("{ }", .accepted)
        expectSameAsDecoder("null", .accepted)
        // Trailing commas are JSONDecoder's; a missing element is not.
        expectSameAsDecoder("[1,]", .accepted)
        expectSameAsDecoder("[1 , ]", .accepted)
        expectSameAsDecoder(#"{"a":1,}"#, .accepted)
        expectSameAsDecoder("[,]", .rejected)
        expectSameAsDecoder("[,1]", .rejected)
        expectSameAsDecoder("[1,,]", .rejected)
        expectSameAsDecoder("{,}", .rejected)
        expectSameAsDecoder(#"{"a":1,,}"#, .rejected)
        expectSameAsDecoder("[1 2]", .rejected)
        expectSameAsDecoder(#"{"a":}"#, .rejected)
        expectSameAsDecoder(#"{"a"}"#, .rejected)
        expectSameAsDecoder(#"{"a" 1}"#, .rejected)
        expectSameAsDecoder("{a:1}", .rejected)
        expectSameAsDecoder("{'a':1}", .rejected)
        expectSameAsDecoder(#"{"a":1 "b":2}"#, .rejected)
        expectSameAsDecoder(#"{1:1}"#, .rejected)
        expectSameAsDecoder("[", .rejected)
        expectSameAsDecoder("{", .rejected)
        expectSameAsDecoder(#"{"a":1"#, .rejected)
        expectSameAsDecoder(#"{"a":1,"#, .rejected)
    }

    @Test func literals() {
        for text in ["true", "false", "null", "[true,false,null]"] {
            expectSameAsDecoder(text, .accepted)
        }
        for text in ["tru", "nul", "fals", "True", "FALSE", "NULL", "nulls", "truex", "[truex]", "[nul]", "t", "nil",
                     "undefined", "NaN", "Infinity", "[-Infinity]"] {
            expectSameAsDecoder(text, .rejected)
        }
    }

    @Test func numbers() {
        for text in ["0", "-0", "-0.0", "-0e5", "0e-5", "0E400", "0.000e999999999999999999", "1e5", "1E+5", "1e-5",
                     "1e+05", "1e0005", "-1.5e-0", "1.5e3", "-1.5E-3", "0.1", "0.30000000000000004",
                     "0.30000000000000001665", "123456789012345678901234567890", "9007199254740992", "9007199254740993",
                     "9007199254740993.0", "9007199254740992.5", "-9007199254740993", "18446744073709551615",
                     "18446744073709551616", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
                     "999999999999999", "9999999999999999", "-999999999999999",
                     "1.7976931348623157e308", "1.7976931348623158e308", "17976931348623157e292",
                     "2.2250738585072011e-308", "2.2250738585072014e-308", "4.9e-324", "5e-324", "3e-324",
                     "2.4703282292062328e-324", "1e-310", "1e22", "1e23",
                     "1" + String(repeating: "0", count: 308), "1." + String(repeating: "0", count: 400) + "1",
                     "0." + String(repeating: "0", count: 300) + "1e300"] {
            expectSameAsDecoder(text, .accepted)
            expectSameAsDecoder("[\(text)]", .accepted)
            expectSameAsDecoder("{\"n\":\(text)}", .accepted)
        }
        for text in ["01", "00", "-01", "00e1", "1.", "-0.e1", ".5", "-.5", "+1", "-", "--1", "1e", "1e+", "1E+-5",
                     "1.e5", "1e1.5", "1e5e5", "1.5.5", "1e-5-5", "0-1", "1+1", "0x10", "1e400", "-1e400", "1E400",
                     "1e-400", "-1e-400", "0.1e-400", "1e-324", "2e-324", "2.4703282292062327e-324",
                     "1.7976931348623159e308", "123.456e-789", String(repeating: "9", count: 400),
                     "1" + String(repeating: "0", count: 309), "0." + String(repeating: "0", count: 400) + "1",
                     "1 2", "- 1", "1_000", "١"] {
            expectSameAsDecoder(text, .rejected)
            expectSameAsDecoder("[\(text)]", .rejected)
            expectSameAsDecoder("{\"n\":\(text)}", .rejected)
        }
        // A zero is kept or refused by where its exponent's digits fall (see
        // JSONReader.decoderTakesForZero); an underflow can even be kept.
        let zeros = String(repeating: "0", count: 400)
        for text in ["0e0", "0e10", "0e-5", "-0e5", "0.0e5", "0e99", "0." + zeros + "001e0"] {
            expectSameAsDecoder(text, .accepted)
            expectSameAsDecoder("[\(text)]", .accepted)
        }
        for text in ["0e5", "0E4", "0e1", "0.00e9", "0.000e9", "-0.0e1", "0." + zeros + "01e0"] {
            expectSameAsDecoder(text, .rejected)
            expectSameAsDecoder("[\(text)]", .rejected)
        }
    }

    @Test func numberValues() throws {
        guard case .number(let negativeZero) = try #require(readerValue(Array("-0".utf8))) else {
            Issue.record("-0 is not a number")
            return
        }
        #expect(negativeZero == 0 && negativeZero.sign == .minus)
        #expect(readerValue(Array("9007199254740993".utf8)) == .number(9_007_199_254_740_992))
        #expect(readerValue(Array("3e-324".utf8)) == .number(.leastNonzeroMagnitude))
        #expect(readerValue(Array("1.7976931348623158e308".utf8)) == .number(.greatestFiniteMagnitude))
    }

    @Test func escapes() {
        expectSameAsDecoder(#"["\"\\\/\b\f\n\r\t"]"#, .accepted)
        expectSameAsDecoder(#"["\u0041\u00e9\u20AC\uD83D\uDE00"]"#, .accepted)
        expectSameAsDecoder(#"["\ud83d\ude00", "\uDBFF\uDFFF", "\uD800\uDC00", "\uFFFF", "\uFEFF"]"#, .accepted)
        expectSameAsDecoder(#"["\u0000", "a\u0000b", "\u001f"]"#, .accepted)
        expectSameAsDecoder(#"["plain", "", "tail\n", "\nhead", "x\\"]"#, .accepted)
        expectSameAsDecoder(#"{"\n\u0041\"":"key with escapes"}"#, .accepted)
        for text in [#"["\uD800"]"#, #"["\uD800x"]"#, #"["\uD800\u0041"]"#, #"["\uD800\uD800"]"#, #"["\uDC00"]"#,
                     #"["\uDC00\uD800"]"#, #"["\uD83D\ude00\uD83D"]"#, #"["\uD800\n"]"#, #"["\uD800\"]"#,
                     #"["\u12"]"#, #"["\u12G4"]"#, #"["\u+123"]"#, #"["\u-123"]"#, #"["\u 123"]"#, #"["\U0041"]"#,
                     #"["\x41"]"#, #"["\a"]"#, #"["\'"]"#, #"["\0"]"#, #"["\"]"#, #"["\u"]"#, #"["\u00"#, "[\"\\"] {
            expectSameAsDecoder(text, .rejected)
        }
        #expect(readerValue(Array(#""\u0000\ud83d\ude00\u00e9""#.utf8)) == .string("\u{0}😀é"))
    }

    @Test func rawBytesInStrings() {
        func inString(_ raw: [UInt8]) -> [UInt8] { [0x5B, 0x22] + raw + [0x22, 0x5D] }
        for raw: [UInt8] in [[0x7F], [0xC3, 0xA9], [0xEF, 0xBF, 0xBF], [0xEF, 0xBB, 0xBF], [0xF0, 0x9F, 0x98, 0x80],
                             [0xF4, 0x8F, 0xBF, 0xBF], [0x20, 0x7E]] {
            expectSameAsDecoder(inString(raw), .accepted)
        }
        // Control characters, and UTF-8 that is not: truncated, overlong, a surrogate, past
        // U+10FFFF, a lone continuation byte, bytes never in UTF-8. HTTP bodies arrive unchecked.
        for raw: [UInt8] in [[0x00], [0x01], [0x09], [0x0A], [0x0D], [0x1F], [0xC3], [0xC3, 0x5C, 0x6E], [0xC0, 0xAF],
                             [0xE0, 0x80, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0x80], [0xBF],
                             [0xFE], [0xFF], [0xF8, 0x88, 0x80, 0x80, 0x80], [0x5C, 0x6E, 0xFF], [0xFF, 0x5C, 0x6E]] {
            expectSameAsDecoder(inString(raw), .rejected)
        }
        expectSameAsDecoder([0x7B, 0x22, 0xFF, 0x22, 0x3A, 0x31, 0x7D], .rejected)
        expectSameAsDecoder([0x5B, 0xC3, 0xA9, 0x5D], .rejected)
        expectSameAsDecoder(#"["abc]"#, .rejected)
        expectSameAsDecoder(#"["abc"#, .rejected)
        expectSameAsDecoder(#""abc\""#, .rejected)
    }

    @Test func nestingDepth() {
        // JSONDecoder takes about half a second for each accepted document this deep.
        expectSameAsDecoder(nested(512), .accepted)
        expectSameAsDecoder(nested(513), .rejected)
        expectSameAsDecoder(nested(512, open: #"{"a":"#, close: "}", inner: "1"), .accepted)
        expectSameAsDecoder(nested(513, open: #"{"a":"#, close: "}", inner: "1"), .rejected)
        expectSameAsDecoder(nested(256, open: #"[{"k":"#, close: "}]", inner: "1"), .accepted)
        expectSameAsDecoder("[" + nested(256, open: #"[{"k":"#, close: "}]", inner: "1") + "]", .rejected)
        // Deep input is refused at level 513 without going deeper, whether closed or not.
        expectSameAsDecoder(String(repeating: "[", count: 100_000), .rejected)
        expectSameAsDecoder(nested(100_000), .rejected)
        expectSameAsDecoder(nested(100_000, open: #"{"a":"#, close: "}"), .rejected)
    }

    @Test func byteOrderMarksAndWideEncodings() {
        let object: [UInt8] = [0x7B, 0x7D]
        expectSameAsDecoder([0xEF, 0xBB, 0xBF] + object, .accepted)
        expectSameAsDecoder([0xEF, 0xBB, 0xBF, 0xEF, 0xBB, 0xBF] + object, .rejected)
        expectSameAsDecoder([0xEF, 0xBB, 0xBF], .rejected)
        expectSameAsDecoder([0xEF, 0xBB] + object, .rejected)
        expectSameAsDecoder([0x20, 0xEF, 0xBB, 0xBF] + object, .rejected)
        // UTF-16 and UTF-32, by BOM or by where the zero bytes are.
        expectSameAsDecoder([0xFF, 0xFE, 0x7B, 0x00, 0x7D, 0x00], .accepted)
        expectSameAsDecoder([0xFE, 0xFF, 0x00, 0x7B, 0x00, 0x7D], .accepted)
        expectSameAsDecoder([0x7B, 0x00, 0x7D, 0x00], .accepted)
        expectSameAsDecoder([0x00, 0x7B, 0x00, 0x7D], .accepted)
        expectSameAsDecoder([0x31, 0x00], .accepted)
        expectSameAsDecoder([0x00, 0x31], .accepted)
        expectSameAsDecoder([0xFF, 0xFE, 0x31, 0x00], .accepted)
        expectSameAsDecoder([0x00, 0x00, 0xFE, 0xFF, 0x00, 0x00, 0x00, 0x7B, 0x00, 0x00, 0x00, 0x7D], .accepted)
        expectSameAsDecoder([0x00, 0x00, 0x00, 0x5B, 0x00, 0x00, 0x00, 0x5D], .accepted)
        expectSameAsDecoder([0x5B, 0x00, 0x00, 0x00, 0x5D, 0x00, 0x00, 0x00], .accepted)
        // FE FF 00 00 is taken for a UTF-32LE BOM, FF FE 00 00 for UTF-16LE and a NUL.
        expectSameAsDecoder([0xFE, 0xFF, 0x00, 0x00, 0x7B, 0x00, 0x00, 0x00, 0x7D, 0x00, 0x00, 0x00], .accepted)
        expectSameAsDecoder([0xFF, 0xFE, 0x00, 0x00, 0x7B, 0x00, 0x00, 0x00, 0x7D, 0x00, 0x00, 0x00], .rejected)
        // A last incomplete code unit is dropped; a second BOM stays (as U+FEFF, not whitespace).
        expectSameAsDecoder([0x7B, 0x00, 0x7D, 0x00, 0x20], .accepted)
        expectSameAsDecoder([0xFF, 0xFE, 0x7B, 0x00, 0x7D], .rejected)
        expectSameAsDecoder([0x5B, 0x00, 0x00, 0x00, 0x5D, 0x00, 0x00, 0x00, 0x20, 0x20, 0x20], .accepted)
        expectSameAsDecoder([0x5B, 0x00, 0x00, 0x00, 0x5D, 0x00, 0x00], .rejected)
        expectSameAsDecoder([0xFF, 0xFE, 0xFF, 0xFE, 0x7B, 0x00, 0x7D, 0x00], .rejected)
        expectSameAsDecoder([0xFE, 0xFF, 0xFE, 0xFF, 0x00, 0x7B, 0x00, 0x7D], .rejected)
        expectSameAsDecoder([0xFF, 0xFE], .rejected)
        expectSameAsDecoder([0xFE, 0xFF], .rejected)
        // Characters: a pair, a lone surrogate (either encoding), beyond U+10FFFF.
        expectSameAsDecoder([0xFF, 0xFE, 0x5B, 0x00, 0x22, 0x00, 0x3D, 0xD8, 0x00, 0xDE, 0x22, 0x00, 0x5D, 0x00], .accepted)
        expectSameAsDecoder([0x5B, 0x00, 0x22, 0x00, 0xE9, 0x00, 0x22, 0x00, 0x5D, 0x00], .accepted)
        expectSameAsDecoder([0xFF, 0xFE, 0x5B, 0x00, 0x22, 0x00, 0x3D, 0xD8, 0x22, 0x00, 0x5D, 0x00], .rejected)
        expectSameAsDecoder([0xFF, 0xFE, 0x5B, 0x00, 0x22, 0x00, 0x00, 0xDE, 0x22, 0x00, 0x5D, 0x00], .rejected)
        expectSameAsDecoder([0x5B, 0, 0, 0, 0x22, 0, 0, 0, 0x00, 0x00, 0x10, 0x00, 0x22, 0, 0, 0, 0x5D, 0, 0, 0], .accepted)
        expectSameAsDecoder([0x5B, 0, 0, 0, 0x22, 0, 0, 0, 0x00, 0x00, 0x11, 0x00, 0x22, 0, 0, 0, 0x5D, 0, 0, 0], .rejected)
        expectSameAsDecoder([0x5B, 0, 0, 0, 0x22, 0, 0, 0, 0x00, 0xD8, 0x00, 0x00, 0x22, 0, 0, 0, 0x5D, 0, 0, 0], .rejected)
        // Three bytes fit no wide pattern: UTF-8, where a NUL is not JSON.
        expectSameAsDecoder([0x00, 0x31, 0x00], .rejected)
        expectSameAsDecoder([0x00], .rejected)
        expectSameAsDecoder([0x00, 0x00], .rejected)
    }

    @Test func readsOnlyTheReadableBytes() {
        var buffer = ByteBuffer(string: #"xx{"a":1}yy"#)
        buffer.moveReaderIndex(forwardBy: 2)
        buffer.moveWriterIndex(to: buffer.writerIndex - 2)
        #expect(JSONReader.read(buffer) == .object(["a": .number(1)]))
        #expect(JSONReader.read(ByteBuffer(string: #"{"a":1}yy"#).getSlice(at: 0, length: 7)!) == .object(["a": .number(1)]))
    }

    @Test func requestFieldsKeepTheirErrors() throws {
        let notJSON = try #require(refusal(RequestFields.parse(ByteBuffer(string: #"{"a":1"#), what: "a request")))
        #expect(notJSON == ProtocolError(.badJSON, "not valid JSON"))
        let array = try #require(refusal(RequestFields.parse(ByteBuffer(string: "[1,]"), what: "the body")))
        #expect(array == ProtocolError(.badJSON, "the body must be a JSON object"))
        let fields = try RequestFields.parse(ByteBuffer(string: #"{"type":"join","room":"r1","type":"x"}"#), what: "a request").get()
        #expect(try fields.string("type") == "join")
    }
}

// MARK: - Generated documents and their mutations

/// SplitMix64: the same numbers on every run and every platform.
private struct SeededRandom {
    private var state: UInt64

    init(seed: UInt64) {
        state = seed
    }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }

    /// A number in 0..<bound.
    mutating func below(_ bound: Int) -> Int {
        Int(next() % UInt64(bound))
    }

    mutating func chance(_ percent: Int) -> Bool {
        below(100) < percent
    }

    mutating func pick<Element>(_ elements: [Element]) -> Element {
        elements[below(elements.count)]
    }
}

/// Valid JSON (as JSONDecoder sees it: trailing commas included) shaped like requests,
/// with the edges of every part: repeated keys, escapes, surrogate pairs, raw UTF-8,
/// numbers near the limits of a Double, all four whitespace bytes, wide encodings.
private struct DocumentGenerator {
    var random: SeededRandom

    private static let keys = ["type", "room", "text", "ref", "since", "a", "b", "", "é", "e\u{301}", #"\u0061"#,
                               #"\u00e9"#, #"t\u0079pe"#, #"\n"#, "😀", #"\ud83d\ude00"#]
    private static let stringPieces = ["join", "r1", "hello world", " ", "é", "€", "😀", "\u{FEFF}", "\u{7F}", "e\u{301}",
                                       #"\""#, #"\\"#, #"\/"#, #"\b"#, #"\f"#, #"\n"#, #"\r"#, #"\t"#, #"\u0000"#,
                                       #"\u001F"#, #"\u00E9"#, #"\u20ac"#, #"\uFFFF"#, #"\ud83d\ude00"#, #"\uDBFF\uDFFF"#,
                                       #"\u0022"#, #"\u005C"#, "/", "'", "ünïcödé"]
    private static let numbers = ["0", "-0", "1", "-1", "42", "117", "200", "-0.0", "0.5", "-1.25", "3.14159",
                                  "1e3", "1E-3", "2.5e+10", "-7e0", "1e308", "-1.7976931348623157e308", "5e-324",
                                  "2.2250738585072014e-308", "1e-320", "0e-999", "9007199254740991", "9007199254740993",
                                  "-9223372036854775809", "123456789012345678901234567890", "0.1", "0.30000000000000004",
                                  "1.7976931348623157e308", "4.9406564584124654e-324", "100000000000000000000000"]

    mutating func document() -> [UInt8] {
        var text = ""
        whitespace(&text)
        if random.chance(85) { container(&text, depth: 0, isObject: true) } else { value(&text, depth: 0) }
        whitespace(&text)
        if random.chance(3) {
            // Deeper, though far from the limit of 512: JSONDecoder takes time that grows with
            // the square of the depth (half a second at 512). nestingDepth tests the limit.
            let depth = 4 + random.below(12)
            text = String(repeating: #"[{"a":"#, count: depth) + text + String(repeating: "}]", count: depth)
        }
        return encoded(text)
    }

    /// Mostly UTF-8; now and then with a BOM or in UTF-16 or UTF-32.
    private mutating func encoded(_ text: String) -> [UInt8] {
        switch random.below(40) {
        case 0: return [0xEF, 0xBB, 0xBF] + Array(text.utf8)
        case 1: return Self.utf16(text, bigEndian: false, bom: random.chance(50))
        case 2: return Self.utf16(text, bigEndian: true, bom: random.chance(50))
        case 3: return Self.utf32(text, bigEndian: random.chance(50), bom: random.chance(50))
        default: return Array(text.utf8)
        }
    }

    private static func utf16(_ text: String, bigEndian: Bool, bom: Bool) -> [UInt8] {
        let units = (bom ? [0xFEFF] : []) + Array(text.utf16)
        return units.flatMap { unit in
            bigEndian ? [UInt8(unit >> 8), UInt8(unit & 0xFF)] : [UInt8(unit & 0xFF), UInt8(unit >> 8)]
        }
    }

    private static func utf32(_ text: String, bigEndian: Bool, bom: Bool) -> [UInt8] {
        let scalars = (bom ? [0xFEFF] : []) + text.unicodeScalars.map(\.value)
        return scalars.flatMap { scalar in
            let bytes = (0..<4).map { UInt8(truncatingIfNeeded: scalar >> (8 * $0)) }
            return bigEndian ? bytes.reversed() : bytes
        }
    }

    private mutating func value(_ text: inout String, depth: Int) {
        switch random.below(depth > 4 ? 6 : 9) {
        case 0: text += random.pick(["true", "false", "null"])
        case 1, 2: number(&text)
        case 3, 4, 5: string(&text)
        case 6: container(&text, depth: depth + 1, isObject: false)
        default: container(&text, depth: depth + 1, isObject: true)
        }
    }

    /// An object or an array: whitespace anywhere, now and then a trailing comma.
    private mutating func container(_ text: inout String, depth: Int, isObject: Bool) {
        text += isObject ? "{" : "["
        let count = random.below(isObject ? 7 : 5)
        for index in 0..<count {
            whitespace(&text)
            if isObject {
                text += "\"" + random.pick(Self.keys) + "\""
                whitespace(&text)
                text += ":"
                whitespace(&text)
            }
            value(&text, depth: depth)
            whitespace(&text)
            if index < count - 1 || random.chance(5) { text += "," }
        }
        whitespace(&text)
        text += isObject ? "}" : "]"
    }

    private mutating func string(_ text: inout String) {
        text += "\""
        for _ in 0..<random.below(5) {
            text += random.pick(Self.stringPieces)
        }
        text += "\""
    }

    private mutating func number(_ text: inout String) {
        guard random.chance(50) else {
            text += random.pick(Self.numbers)
            return
        }
        if random.chance(30) { text += "-" }
        text += random.chance(20) ? "0" : String(1 + random.below(9)) + digits(random.below(22))
        if random.chance(30) { text += "." + digits(1 + random.below(20)) }
        if random.chance(25) {
            text += random.pick(["e", "E", "e+", "e-", "E-"]) + digits(1 + random.below(3))
        }
    }

    private mutating func digits(_ count: Int) -> String {
        String((0..<count).map { _ in Character(String(random.below(10))) })
    }

    private mutating func whitespace(_ text: inout String) {
        if random.chance(70) { return }
        for _ in 0..<(1 + random.below(2)) {
            text += random.pick([" ", " ", "\t", "\n", "\r", "\r\n"])
        }
    }
}

/// Damage of the kind a fuzzer does: flipped, inserted and deleted bytes, cuts, repeats.
private struct Mutator {
    var random: SeededRandom

    /// Bytes that change how JSON reads, and bytes UTF-8 or JSON forbid.
    private static let telling: [UInt8] = Array(#""\{}[],:0123456789-+.eEutfn/ "#.utf8)
        + [0x09, 0x0A, 0x0D, 0x0C, 0x00, 0x01, 0x1F, 0x7F, 0x80, 0xBF, 0xC3, 0xA9, 0xED, 0xA0, 0xF0, 0xF4, 0xFE, 0xFF]

    mutating func mutated(_ document: [UInt8]) -> [UInt8] {
        var bytes = document
        guard !bytes.isEmpty else { return [random.pick(Self.telling)] }
        let at = random.below(bytes.count)
        switch random.below(7) {
        case 0: bytes[at] = random.pick(Self.telling)
        case 1: bytes[at] = UInt8(truncatingIfNeeded: random.next())
        case 2: bytes[at] ^= 1 << UInt8(random.below(8))
        case 3: bytes.insert(random.pick(Self.telling), at: at)
        case 4: bytes.remove(at: at)
        case 5: bytes.removeLast(bytes.count - at)
        default:
            let end = min(bytes.count, at + 1 + random.below(12))
            bytes.insert(contentsOf: bytes[at..<end], at: random.below(bytes.count))
        }
        return bytes
    }
}

@Suite struct JSONReaderDifferentialTests {
    /// Every generated document and three mutations of each, read by both parsers.
    @Test func agreesWithJSONDecoderOnGeneratedDocumentsAndMutations() {
        var generator = DocumentGenerator(random: SeededRandom(seed: 0x6A73_6F6E_7265_6164))
        var mutator = Mutator(random: SeededRandom(seed: 0x6D75_7461_7465))
        var compared = 0, accepted = 0, acceptedMutations = 0, mismatches = 0
        for _ in 0..<2_500 {
            let document = generator.document()
            var inputs = [document]
            for _ in 0..<3 {
                // Some mutations build on the previous one, to reach more than one change.
                inputs.append(mutator.mutated(mutator.random.chance(25) ? inputs.last! : document))
            }
            for (index, input) in inputs.enumerated() {
                let reference = decoderValue(input)
                let read = readerValue(input)
                compared += 1
                if reference != nil {
                    if index == 0 { accepted += 1 } else { acceptedMutations += 1 }
                }
                guard !identical(read, reference) else { continue }
                mismatches += 1
                if mismatches <= 10 {
                    Issue.record("\(shown(input)): JSONReader \(String(describing: read)), JSONDecoder \(String(describing: reference))")
                }
            }
        }
        #expect(mismatches == 0, "\(mismatches) of \(compared) inputs read differently")
        // Most generated documents are valid JSON (not all: some numbers overflow, some
        // zeros JSONDecoder refuses) and many mutations still are: both outcomes get compared.
        #expect(accepted > 2_300, "only \(accepted) generated documents are valid JSON")
        #expect(acceptedMutations > 1_000, "only \(acceptedMutations) mutations are still valid JSON")
    }
}
