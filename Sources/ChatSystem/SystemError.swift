#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: what we tried, and the errno it gave.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.errno = errno
    }

    /// The C library's text for `errno`, lower-cased as in "address already in use".
    public var reason: String {
        let text = String(cString: strerror(errno))
        guard let first = text.first else { return text }
        return first.lowercased() + text.dropFirst()
    }

    public var description: String { "\(operation): \(reason)" }
}
