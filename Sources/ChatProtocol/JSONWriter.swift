import NIOCore

/// Writes JSON straight into a ByteBuffer. Every server frame is built here, once per
/// message, so this is the one JSON encoder path of the hot path (no Foundation, no
/// intermediate dictionaries).
public struct JSONWriter {
    public private(set) var buffer: ByteBuffer
    private var needsComma = false

    public init(buffer: ByteBuffer) {
        self.buffer = buffer
    }

    public mutating func beginObject() {
        separate()
        buffer.writeInteger(UInt8(ascii: "{"))
        needsComma = false
    }

    public mutating func endObject() {
        buffer.writeInteger(UInt8(ascii: "}"))
        needsComma = true
    }

    public mutating func beginArray(_ key: StaticString) {
        self.key(key)
        buffer.writeInteger(UInt8(ascii: "["))
        needsComma = false
    }

    public mutating func endArray() {
        buffer.writeInteger(UInt8(ascii: "]"))
        needsComma = true
    }

    public mutating func field(_ key: StaticString, _ value: String) {
        self.key(key)
        writeString(value)
    }

    public mutating func field(_ key: StaticString, _ value: Int) {
        self.key(key)
        buffer.writeString(String(value))
        needsComma = true
    }

    public mutating func field(_ key: StaticString, _ value: Bool) {
        self.key(key)
        buffer.writeString(value ? "true" : "false")
        needsComma = true
    }

    /// Writes a field only when the value is present (optional protocol fields are omitted, not null).
    public mutating func field(_ key: StaticString, ifPresent value: String?) {
        if let value { field(key, value) }
    }

    /// Writes `key` with raw bytes that are already valid JSON (a pre-encoded string).
    public mutating func field(_ key: StaticString, rawJSON: ByteBuffer) {
        self.key(key)
        var copy = rawJSON
        buffer.writeBuffer(&copy)
        needsComma = true
    }

    /// Keys are literals, the protocol's field names: one with nothing to escape (all of
    /// them) is written as it is, with its comma, quotes and colon, in one write.
    private mutating func key(_ key: StaticString) {
        let comma = needsComma
        needsComma = false
        key.withUTF8Buffer { name in
            guard !name.isEmpty, !name.contains(where: Self.needsEscape) else {
                if comma { buffer.writeInteger(UInt8(ascii: ",")) }
                writeString(key.description)
                buffer.writeInteger(UInt8(ascii: ":"))
                needsComma = false
                return
            }
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: name.count + 4) { out in
                var at = 0
                if comma { out[at] = UInt8(ascii: ","); at += 1 }
                out[at] = UInt8(ascii: "\"")
                UnsafeMutableRawBufferPointer(rebasing: out[(at + 1)...]).copyMemory(from: UnsafeRawBufferPointer(name))
                at += 1 + name.count
                out[at] = UInt8(ascii: "\"")
                out[at + 1] = UInt8(ascii: ":")
                return at + 2
            }
        }
    }

    private mutating func separate() {
        if needsComma { buffer.writeInteger(UInt8(ascii: ",")) }
    }

    /// A quoted, escaped string, in one write of the length it will have (each write to a
    /// ByteBuffer costs a uniqueness and an exclusivity check).
    private mutating func writeString(_ value: String) {
        var value = value
        value.withUTF8 { bytes in
            let length = Self.quotedLength(bytes)
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { out in
                Self.writeQuoted(bytes, length: length, into: out, at: 0)
            }
        }
        needsComma = true
    }

    /// The length of `bytes` as a JSON string: quoted, escaped.
    static func quotedLength(_ bytes: UnsafeBufferPointer<UInt8>) -> Int {
        var escapes = 0
        for byte in bytes where needsEscape(byte) { escapes += escapeLength(byte) - 1 }
        return bytes.count + escapes + 2
    }

    /// Writes `bytes` as a JSON string of `length` (`quotedLength`) at `out[at...]`;
    /// answers where the next byte goes.
    static func writeQuoted(_ bytes: UnsafeBufferPointer<UInt8>, length: Int, into out: UnsafeMutableRawBufferPointer, at start: Int) -> Int {
        out[start] = UInt8(ascii: "\"")
        var at = start + 1
        if length == bytes.count + 2 {
            UnsafeMutableRawBufferPointer(rebasing: out[at...]).copyMemory(from: UnsafeRawBufferPointer(bytes))
            at += bytes.count
        } else {
            for byte in bytes {
                if needsEscape(byte) {
                    at = writeEscape(byte, into: out, at: at)
                } else {
                    out[at] = byte
                    at += 1
                }
            }
        }
        out[at] = UInt8(ascii: "\"")
        return at + 1
    }

    private static func needsEscape(_ byte: UInt8) -> Bool {
        byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\")
    }

    private static func escapeLength(_ byte: UInt8) -> Int {
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): 2
        default: 6  // \u00XX
        }
    }

    /// Writes `byte`'s escape at `at`; answers where the next byte goes.
    private static func writeEscape(_ byte: UInt8, into out: UnsafeMutableRawBufferPointer, at: Int) -> Int {
        out[at] = UInt8(ascii: "\\")
        let short: UInt8? = switch byte {
        case UInt8(ascii: "\""): UInt8(ascii: "\"")
        case UInt8(ascii: "\\"): UInt8(ascii: "\\")
        case UInt8(ascii: "\n"): UInt8(ascii: "n")
        case UInt8(ascii: "\r"): UInt8(ascii: "r")
        case UInt8(ascii: "\t"): UInt8(ascii: "t")
        default: nil
        }
        if let short {
            out[at + 1] = short
            return at + 2
        }
        let hex: StaticString = "0123456789abcdef"
        out[at + 1] = UInt8(ascii: "u")
        out[at + 2] = UInt8(ascii: "0")
        out[at + 3] = UInt8(ascii: "0")
        out[at + 4] = hex.utf8Start[Int(byte >> 4)]
        out[at + 5] = hex.utf8Start[Int(byte & 0x0f)]
        return at + 6
    }
}
