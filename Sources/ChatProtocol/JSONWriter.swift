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

    public mutating func beginArray(_ key: String) {
        self.key(key)
        buffer.writeInteger(UInt8(ascii: "["))
        needsComma = false
    }

    public mutating func endArray() {
        buffer.writeInteger(UInt8(ascii: "]"))
        needsComma = true
    }

    public mutating func field(_ key: String, _ value: String) {
        self.key(key)
        writeString(value)
    }

    public mutating func field(_ key: String, _ value: Int) {
        self.key(key)
        buffer.writeString(String(value))
        needsComma = true
    }

    public mutating func field(_ key: String, _ value: Bool) {
        self.key(key)
        buffer.writeString(value ? "true" : "false")
        needsComma = true
    }

    /// Writes a field only when the value is present (optional protocol fields are omitted, not null).
    public mutating func field(_ key: String, ifPresent value: String?) {
        if let value { field(key, value) }
    }

    /// Writes `key` with raw bytes that are already valid JSON (a pre-encoded string).
    public mutating func field(_ key: String, rawJSON: ByteBuffer) {
        self.key(key)
        var copy = rawJSON
        buffer.writeBuffer(&copy)
        needsComma = true
    }

    private mutating func key(_ key: String) {
        separate()
        writeString(key)
        buffer.writeInteger(UInt8(ascii: ":"))
        needsComma = false
    }

    private mutating func separate() {
        if needsComma { buffer.writeInteger(UInt8(ascii: ",")) }
    }

    private mutating func writeString(_ value: String) {
        buffer.writeInteger(UInt8(ascii: "\""))
        var value = value
        value.withUTF8 { bytes in
            var runStart = 0
            for (index, byte) in bytes.enumerated() where byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
                buffer.writeBytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[runStart..<index]))
                writeEscape(byte)
                runStart = index + 1
            }
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[runStart...]))
        }
        buffer.writeInteger(UInt8(ascii: "\""))
        needsComma = true
    }

    private mutating func writeEscape(_ byte: UInt8) {
        switch byte {
        case UInt8(ascii: "\""): buffer.writeString("\\\"")
        case UInt8(ascii: "\\"): buffer.writeString("\\\\")
        case UInt8(ascii: "\n"): buffer.writeString("\\n")
        case UInt8(ascii: "\r"): buffer.writeString("\\r")
        case UInt8(ascii: "\t"): buffer.writeString("\\t")
        default:
            let hex: [UInt8] = Array("0123456789abcdef".utf8)
            buffer.writeString("\\u00")
            buffer.writeInteger(hex[Int(byte >> 4)])
            buffer.writeInteger(hex[Int(byte & 0x0f)])
        }
    }
}
