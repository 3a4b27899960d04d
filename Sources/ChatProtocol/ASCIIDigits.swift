/// Unsigned integers written as ASCII digits straight into memory: the handshake's hot
/// path (`hello`'s heartbeat, the connection id) writes numbers without an interpolation.
public enum ASCIIDigits {
    /// How many digits `value` takes in `radix` (2 to 16).
    @inlinable
    public static func count(_ value: UInt64, radix: UInt64 = 10) -> Int {
        var count = 1, rest = value / radix
        while rest > 0 { count += 1; rest /= radix }
        return count
    }

    /// Writes `value` in `radix` (lower-case letters above 9) at `out[at...]`, which must
    /// hold `count(value, radix:)` bytes; answers the offset after the last digit.
    @inlinable
    public static func write(_ value: UInt64, radix: UInt64 = 10, into out: UnsafeMutableRawBufferPointer, at: Int) -> Int {
        let end = at + count(value, radix: radix)
        var rest = value
        for i in stride(from: end - 1, through: at, by: -1) {
            let digit = UInt8(rest % radix)
            out[i] = digit < 10 ? UInt8(ascii: "0") + digit : UInt8(ascii: "a") + digit - 10
            rest /= radix
        }
        return end
    }
}
