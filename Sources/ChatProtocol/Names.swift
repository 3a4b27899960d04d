/// The name rules of docs/PROTOCOL.md "Identity".
public enum Names {
    /// 1 to 32 characters from [A-Za-z0-9_.-].
    public static func isValidUser(_ name: Substring) -> Bool {
        follows(name, maxLength: 32, punctuation: "_.-")
    }

    public static func isValidUser(_ name: String) -> Bool { isValidUser(name[...]) }

    /// 1 to 64 characters from [A-Za-z0-9_.:-].
    public static func isValidRoom(_ name: String) -> Bool {
        follows(name[...], maxLength: 64, punctuation: "_.:-")
    }

    /// 1 to `maxLength` bytes, each a letter, a digit or one of `punctuation`. Read where the
    /// bytes lie: every handshake checks a name, and a generic walk of a Substring's UTF-8
    /// view goes index by index.
    private static func follows(_ name: Substring, maxLength: Int, punctuation: StaticString) -> Bool {
        var name = name
        let allowed = UnsafeBufferPointer(start: punctuation.utf8Start, count: punctuation.utf8CodeUnitCount)
        return name.withUTF8 { bytes in
            (1...maxLength).contains(bytes.count) && bytes.allSatisfy { isAlphanumeric($0) || allowed.contains($0) }
        }
    }

    /// The user name rule, for the people reading a refusal.
    static let userRule = "1 to 32 characters from [A-Za-z0-9_.-]"
    /// The room name rule, for the people reading a refusal.
    static let roomRule = "1 to 64 characters from [A-Za-z0-9_.:-]"

    /// `name` if it follows the user name rule; else `bad_user`, naming `field` if it came in one.
    public static func checkedUser(_ name: Substring, field: String? = nil) throws(ProtocolError) -> String {
        guard isValidUser(name) else { throw userError(field: field) }
        return String(name)
    }

    static func userError(field: String?) -> ProtocolError {
        ProtocolError(.badUser, field.map { "field \"\($0)\" must be \(userRule)" } ?? "user names are \(userRule)")
    }

    /// `name` if it follows the room name rule; else `bad_room`.
    public static func checkedRoom(_ name: String) throws(ProtocolError) -> String {
        guard isValidRoom(name) else { throw ProtocolError(.badRoom, "room names are \(roomRule)") }
        return name
    }

    private static func isAlphanumeric(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }
}
