import NIOCore

/// Reads one JSON value from a buffer's readable bytes into a `JSONValue`: the parser
/// behind `RequestFields.parse`, so behind every WebSocket request and HTTP API body.
///
/// It exists because Foundation's JSONDecoder was about 15 % of a worker's CPU in a
/// connect+join storm, some 8 µs for a request like `{"type":"join","room":"r1"}` (a Data
/// copy, a scan into a JSONMap, then `JSONValue.init(from:)` trying one single-value decode
/// after another with coding paths). This reads the bytes in place, in one pass, and builds
/// the values directly.
///
/// What it accepts and what it builds are JSONDecoder's (swift-foundation, Swift 6.3),
/// quirks included, so that replacing it changed nothing a client can see; JSONReaderTests
/// compares the two on hand-written edge cases and on thousands of generated documents and
/// mutations of them. The quirks, kept on purpose:
/// - a comma before the closing bracket is accepted: `[1,]`, `{"a":1,}`;
/// - of repeated keys the first wins, and the values of the later ones are only checked
///   the way JSONDecoder's scanner checks them, never decoded: `{"a":1,"a":01}` is accepted;
/// - UTF-16 and UTF-32 input (told by a BOM or by the zero bytes among the first four) is
///   read after transcoding to UTF-8, and a UTF-8 BOM is skipped;
/// - numbers are refused where the nearest Double is infinite, and where it is zero by a
///   rule of JSONDecoder's that mostly, not always, tells an underflow (`decoderTakesForZero`);
/// - more than 512 nested arrays and objects are refused: JSONDecoder's limit, and the bound
///   on this reader's recursion, so no input can exhaust the stack.
struct JSONReader {
    static let maximumDepth = 512

    /// The value of the JSON text in `buffer`'s readable bytes; nil when it is not JSON.
    static func read(_ buffer: ByteBuffer) -> JSONValue? {
        buffer.withUnsafeReadableBytes { raw in
            raw.withMemoryRebound(to: UInt8.self) { bytes in
                let (wideEncoding, bomLength) = WideEncoding.detect(bytes)
                let text = UnsafeBufferPointer(rebasing: bytes[bomLength...])
                guard let wideEncoding else { return parse(text) }
                guard let utf8 = wideEncoding.transcodedToUTF8(text) else { return nil }
                return utf8.withUnsafeBufferPointer { parse($0) }
            }
        }
    }

    private static func parse(_ bytes: UnsafeBufferPointer<UInt8>) -> JSONValue? {
        var reader = JSONReader(bytes: bytes)
        do {
            let value = try reader.readValue(.build)
            reader.skipWhitespace()
            return reader.position == bytes.count ? value : nil
        } catch {
            return nil
        }
    }

    private struct Malformed: Error {}

    /// What to do with a value: build it, or only move past it checking what JSONDecoder's
    /// scanner checks (structure, nesting, where strings end). Skipping is for the values of
    /// repeated keys, which JSONDecoder scans but never decodes.
    private enum Use {
        case build
        case skip
    }

    private let bytes: UnsafeBufferPointer<UInt8>
    private var position = 0
    private var depth = 0
    /// The bytes of a string with escapes, reused from one such string to the next.
    private var unescaped: [UInt8] = []

    private init(bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    // MARK: Values

    /// A skipped value comes back as `.null`, which nobody looks at.
    private mutating func readValue(_ use: Use) throws(Malformed) -> JSONValue {
        switch try peekAfterWhitespace() {
        case UInt8(ascii: "\""):
            guard use == .build else {
                try skipString()
                return .null
            }
            return .string(try readString())
        case UInt8(ascii: "{"):
            return try readObject(use)
        case UInt8(ascii: "["):
            return try readArray(use)
        case UInt8(ascii: "t"):
            try expectLiteral("true")
            return .bool(true)
        case UInt8(ascii: "f"):
            try expectLiteral("false")
            return .bool(false)
        case UInt8(ascii: "n"):
            try expectLiteral("null")
            return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            guard use == .build else {
                skipNumber()
                return .null
            }
            return .number(try readNumber())
        default:
            throw Malformed()
        }
    }

    private mutating func readObject(_ use: Use) throws(Malformed) -> JSONValue {
        try enterContainer()
        defer { depth -= 1 }
        var fields: [String: JSONValue] = [:]
        if try peekAfterWhitespace() == UInt8(ascii: "}") {
            position += 1
            return .object(fields)
        }
        if use == .build {
            // Requests have a handful of fields: no regrowth from 1 to 2 to 4 to 8.
            fields.reserveCapacity(8)
        }
        repeat {
            guard try peekAfterWhitespace() == UInt8(ascii: "\"") else { throw Malformed() }
            // JSONDecoder decodes every key of an object it decodes, repeated or not.
            var key: String?
            if use == .build {
                key = try readString()
            } else {
                try skipString()
            }
            guard try peekAfterWhitespace() == UInt8(ascii: ":") else { throw Malformed() }
            position += 1
            if let key, fields.index(forKey: key) == nil {
                fields[key] = try readValue(.build)
            } else {
                _ = try readValue(.skip)
            }
        } while try continuesAfterMember(closing: UInt8(ascii: "}"))
        return .object(fields)
    }

    private mutating func readArray(_ use: Use) throws(Malformed) -> JSONValue {
        try enterContainer()
        defer { depth -= 1 }
        var elements: [JSONValue] = []
        if try peekAfterWhitespace() == UInt8(ascii: "]") {
            position += 1
            return .array(elements)
        }
        repeat {
            let element = try readValue(use)
            if use == .build { elements.append(element) }
        } while try continuesAfterMember(closing: UInt8(ascii: "]"))
        return .array(elements)
    }

    /// Moves past the opening bracket; refuses the 513th level of nesting as JSONDecoder does.
    private mutating func enterContainer() throws(Malformed) {
        guard depth < Self.maximumDepth else { throw Malformed() }
        depth += 1
        position += 1
    }

    /// After an element or member: true past a comma, false past the closing bracket, which
    /// may follow the comma (JSONDecoder accepts a trailing comma).
    private mutating func continuesAfterMember(closing: UInt8) throws(Malformed) -> Bool {
        switch try peekAfterWhitespace() {
        case closing:
            position += 1
            return false
        case UInt8(ascii: ","):
            position += 1
            if try peekAfterWhitespace() == closing {
                position += 1
                return false
            }
            return true
        default:
            throw Malformed()
        }
    }

    private mutating func expectLiteral(_ literal: StaticString) throws(Malformed) {
        let count = literal.utf8CodeUnitCount
        guard bytes.count - position >= count else { throw Malformed() }
        for offset in 0..<count where bytes[position + offset] != literal.utf8Start[offset] {
            throw Malformed()
        }
        position += count
    }

    // MARK: Whitespace

    /// JSONDecoder's whitespace is RFC 8259's four bytes: not form feed, vertical tab, NBSP.
    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r"):
                position += 1
            default:
                return
            }
        }
    }

    /// The next byte that is not whitespace, not consumed; at the end of input the text is
    /// cut short.
    private mutating func peekAfterWhitespace() throws(Malformed) -> UInt8 {
        skipWhitespace()
        guard position < bytes.count else { throw Malformed() }
        return bytes[position]
    }

    // MARK: Strings

    /// The string whose opening quote is at `position`. Refused as JSONDecoder refuses them:
    /// raw control characters, unknown escapes, lone surrogates and invalid UTF-8.
    private mutating func readString() throws(Malformed) -> String {
        position += 1
        let start = position
        while position < bytes.count {
            switch bytes[position] {
            case UInt8(ascii: "\""):
                let text = UnsafeBufferPointer(rebasing: bytes[start..<position])
                position += 1
                guard let string = String(validating: text, as: UTF8.self) else { throw Malformed() }
                return string
            case UInt8(ascii: "\\"):
                return try readEscapedString(from: start)
            case 0..<0x20:
                throw Malformed()
            default:
                position += 1
            }
        }
        throw Malformed()
    }

    /// The rest of a string from its first escape, at `position`. The raw runs between
    /// escapes are validated together with the escapes' UTF-8, which is the same as
    /// JSONDecoder validating each run alone: an escape's bytes always start a character.
    private mutating func readEscapedString(from start: Int) throws(Malformed) -> String {
        unescaped.removeAll(keepingCapacity: true)
        var runStart = start
        while position < bytes.count {
            switch bytes[position] {
            case UInt8(ascii: "\""):
                unescaped.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<position]))
                position += 1
                guard let string = unescaped.withUnsafeBufferPointer({ String(validating: $0, as: UTF8.self) }) else {
                    throw Malformed()
                }
                return string
            case UInt8(ascii: "\\"):
                unescaped.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<position]))
                try readEscape()
                runStart = position
            case 0..<0x20:
                throw Malformed()
            default:
                position += 1
            }
        }
        throw Malformed()
    }

    /// Appends the character of the escape whose backslash is at `position`.
    private mutating func readEscape() throws(Malformed) {
        guard bytes.count - position >= 2 else { throw Malformed() }
        let escaped = bytes[position + 1]
        position += 2
        switch escaped {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): unescaped.append(escaped)
        case UInt8(ascii: "b"): unescaped.append(0x08)
        case UInt8(ascii: "f"): unescaped.append(0x0C)
        case UInt8(ascii: "n"): unescaped.append(0x0A)
        case UInt8(ascii: "r"): unescaped.append(0x0D)
        case UInt8(ascii: "t"): unescaped.append(0x09)
        case UInt8(ascii: "u"):
            let scalar = try readUnicodeEscape()
            UTF8.encode(scalar) { unescaped.append($0) }
        default:
            throw Malformed()
        }
    }

    /// The character of a `\u` escape whose four digits start at `position`: a high
    /// surrogate must be followed by a `\u` low surrogate. `\u0000` is a character.
    private mutating func readUnicodeEscape() throws(Malformed) -> Unicode.Scalar {
        let unit = try readHexUnit()
        if UTF16.isLeadSurrogate(unit) {
            guard bytes.count - position >= 2, bytes[position] == UInt8(ascii: "\\"),
                  bytes[position + 1] == UInt8(ascii: "u") else { throw Malformed() }
            position += 2
            let trail = try readHexUnit()
            guard UTF16.isTrailSurrogate(trail) else { throw Malformed() }
            let value = 0x10000 + (UInt32(unit - 0xD800) << 10) + UInt32(trail - 0xDC00)
            guard let scalar = Unicode.Scalar(value) else { throw Malformed() }
            return scalar
        }
        guard let scalar = Unicode.Scalar(unit) else { throw Malformed() }
        return scalar
    }

    private mutating func readHexUnit() throws(Malformed) -> UInt16 {
        guard bytes.count - position >= 4 else { throw Malformed() }
        var unit: UInt16 = 0
        for byte in bytes[position..<(position + 4)] {
            guard let digit = HexDigit.value(byte) else { throw Malformed() }
            unit = unit << 4 | UInt16(digit)
        }
        position += 4
        return unit
    }

    /// Moves past a string as JSONDecoder's scanner does, checking only where it ends: an
    /// escape is a backslash and one more byte, or `\u` and four bytes none of them a quote.
    private mutating func skipString() throws(Malformed) {
        position += 1
        while position < bytes.count {
            switch bytes[position] {
            case UInt8(ascii: "\""):
                position += 1
                return
            case UInt8(ascii: "\\"):
                guard bytes.count - position >= 2 else { throw Malformed() }
                guard bytes[position + 1] == UInt8(ascii: "u") else {
                    position += 2
                    continue
                }
                guard bytes.count - position >= 6,
                      !bytes[(position + 2)..<(position + 6)].contains(UInt8(ascii: "\"")) else { throw Malformed() }
                position += 6
            default:
                position += 1
            }
        }
        throw Malformed()
    }

    // MARK: Numbers

    /// A number in RFC 8259's grammar, as the nearest Double (what JSONDecoder's strtod
    /// gives), refused where that is infinite or is zero from non-zero digits.
    private mutating func readNumber() throws(Malformed) -> Double {
        let start = position
        let isNegative = bytes[position] == UInt8(ascii: "-")
        if isNegative { position += 1 }
        let integerStart = position
        guard position < bytes.count else { throw Malformed() }
        if bytes[position] == UInt8(ascii: "0") {
            position += 1
        } else {
            guard skipDigits() > 0 else { throw Malformed() }
        }
        let integerDigits = position - integerStart
        var isInteger = true
        if position < bytes.count, bytes[position] == UInt8(ascii: ".") {
            position += 1
            guard skipDigits() > 0 else { throw Malformed() }
            isInteger = false
        }
        if position < bytes.count, bytes[position] | 0x20 == UInt8(ascii: "e") {
            position += 1
            if position < bytes.count, bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-") {
                position += 1
            }
            guard skipDigits() > 0 else { throw Malformed() }
            isInteger = false
        }
        // Up to 15 digits an integer is exact in a Double: no text conversion needed.
        if isInteger, integerDigits <= 15 {
            var magnitude = 0
            for byte in bytes[integerStart..<position] {
                magnitude = magnitude * 10 + Int(byte - UInt8(ascii: "0"))
            }
            return isNegative ? -Double(magnitude) : Double(magnitude)
        }
        return try Self.nearestDouble(UnsafeBufferPointer(rebasing: bytes[start..<position]))
    }

    /// `Double(String)` is strtod in the C locale, JSONDecoder's conversion, so it rounds
    /// alike; what JSONDecoder refuses of it, this refuses.
    private static func nearestDouble(_ number: UnsafeBufferPointer<UInt8>) throws(Malformed) -> Double {
        guard let value = Double(String(decoding: number, as: UTF8.self)), value.isFinite else { throw Malformed() }
        guard value != 0 || decoderTakesForZero(number) else { throw Malformed() }
        return value
    }

    /// Whether JSONDecoder keeps a number strtod made zero, as written zero rather than an
    /// underflow. It looks for a digit 1-9 before the exponent, four bytes at a time from
    /// the front, but the last `count % 4` bytes from the back: so `0e5` is refused where
    /// `0e0`, `0e10` and `0.0e5` are kept, and `0.` + 402 zeros + `1e0`, an underflow, is
    /// kept as 0. Absurd, and matched on purpose.
    private static func decoderTakesForZero(_ number: UnsafeBufferPointer<UInt8>) -> Bool {
        func verdict(_ byte: UInt8) -> Bool? {
            switch byte {
            case UInt8(ascii: "1")...UInt8(ascii: "9"): return false
            case UInt8(ascii: "e"), UInt8(ascii: "E"): return true
            default: return nil
            }
        }
        let wholeBlocks = number.count / 4 * 4
        for byte in number[..<wholeBlocks] {
            if let verdict = verdict(byte) { return verdict }
        }
        for byte in number[wholeBlocks...].reversed() {
            if let verdict = verdict(byte) { return verdict }
        }
        return true
    }

    /// Moves past the digits at `position`; how many there were.
    private mutating func skipDigits() -> Int {
        let start = position
        while position < bytes.count, bytes[position] >= UInt8(ascii: "0"), bytes[position] <= UInt8(ascii: "9") {
            position += 1
        }
        return position - start
    }

    /// Moves past what JSONDecoder's scanner takes for a number: a run of digits and
    /// `.+-eE`, validated only when decoded.
    private mutating func skipNumber() {
        position += 1
        while position < bytes.count {
            switch bytes[position] {
            case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "+"), UInt8(ascii: "-"),
                 UInt8(ascii: "e"), UInt8(ascii: "E"):
                position += 1
            default:
                return
            }
        }
    }
}

/// The encodings other than UTF-8 JSONDecoder reads (RFC 4627 section 3), told by a BOM or
/// by where the zero bytes are among the first four.
private enum WideEncoding {
    case utf16(bigEndian: Bool)
    case utf32(bigEndian: Bool)

    /// The encoding, nil for UTF-8, and the length of the BOM to skip, decided as JSONDecoder
    /// decides them, down to reading FE FF 00 00 as a UTF-32 little-endian BOM (the real one,
    /// FF FE 00 00, it takes for UTF-16LE).
    static func detect(_ bytes: UnsafeBufferPointer<UInt8>) -> (WideEncoding?, bomLength: Int) {
        func byte(_ index: Int) -> UInt8? { index < bytes.count ? bytes[index] : nil }
        switch (byte(0), byte(1), byte(2), byte(3)) {
        case (0, 0, 0xFE, 0xFF): return (.utf32(bigEndian: true), 4)
        case (0xFE, 0xFF, 0, 0): return (.utf32(bigEndian: false), 4)
        case (0xFE, 0xFF, _, _): return (.utf16(bigEndian: true), 2)
        case (0xFF, 0xFE, _, _): return (.utf16(bigEndian: false), 2)
        case (0xEF, 0xBB, 0xBF, _): return (nil, 3)
        case (0, 0, 0, let fourth?) where fourth != 0: return (.utf32(bigEndian: true), 0)
        case (0, let second?, 0, let fourth?) where second != 0 && fourth != 0: return (.utf16(bigEndian: true), 0)
        case (let first?, 0, 0, 0) where first != 0: return (.utf32(bigEndian: false), 0)
        case (let first?, 0, let third?, 0) where first != 0 && third != 0: return (.utf16(bigEndian: false), 0)
        // Two bytes can be one UTF-16 digit, a whole JSON text.
        case (0, let second?, nil, nil) where second != 0: return (.utf16(bigEndian: true), 0)
        case (let first?, 0, nil, nil) where first != 0: return (.utf16(bigEndian: false), 0)
        default: return (nil, 0)
        }
    }

    /// The text in UTF-8, nil where a code unit is not a character (a lone surrogate, a
    /// value past U+10FFFF). As in `String(bytes:encoding:)`, which JSONDecoder uses, a
    /// last incomplete code unit is dropped and a second BOM is kept as U+FEFF.
    func transcodedToUTF8(_ bytes: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        var utf8: [UInt8] = []
        utf8.reserveCapacity(bytes.count)
        switch self {
        case .utf16(let bigEndian):
            let units = (0..<(bytes.count / 2)).lazy.map { index in
                let high = bytes[2 * index + (bigEndian ? 0 : 1)], low = bytes[2 * index + (bigEndian ? 1 : 0)]
                return UInt16(high) << 8 | UInt16(low)
            }
            var decoder = UTF16()
            var iterator = units.makeIterator()
            while true {
                switch decoder.decode(&iterator) {
                case .scalarValue(let scalar): UTF8.encode(scalar) { utf8.append($0) }
                case .emptyInput: return utf8
                case .error: return nil
                }
            }
        case .utf32(let bigEndian):
            for index in 0..<(bytes.count / 4) {
                var value: UInt32 = 0
                for offset in 0..<4 {
                    value = value << 8 | UInt32(bytes[4 * index + (bigEndian ? offset : 3 - offset)])
                }
                guard let scalar = Unicode.Scalar(value) else { return nil }
                UTF8.encode(scalar) { utf8.append($0) }
            }
            return utf8
        }
    }
}
