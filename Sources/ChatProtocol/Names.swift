/// The name rules of docs/PROTOCOL.md "Identity".
public enum Names {
    /// 1 to 32 characters from [A-Za-z0-9_.-].
    public static func isValidUser(_ name: Substring) -> Bool {
        (1...32).contains(name.utf8.count) && name.utf8.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }
    }

    public static func isValidUser(_ name: String) -> Bool { isValidUser(name[...]) }

    /// 1 to 64 characters from [A-Za-z0-9_.:-].
    public static func isValidRoom(_ name: String) -> Bool {
        (1...64).contains(name.utf8.count) && name.utf8.allSatisfy {
            isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: "-")
        }
    }

    private static func isAlphanumeric(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }
}
