#if canImport(Glibc)
import Glibc
#endif

/// Binds TCP listening sockets for the master to hand to its workers.
public enum ListeningSocket {
    /// Binds and listens on `host:port`. With `reusePort`, several sockets may share the
    /// port and the kernel spreads incoming connections over them evenly.
    public static func bind(host: String, port: Int, backlog: Int32, reusePort: Bool) throws(SystemError) -> Int32 {
        let address = try resolve(host: host, port: port)
        let fd = socket(Int32(address.family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if reusePort {
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        let bound = address.storage.withUnsafeBytes { raw in
            Glibc.bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), address.length)
        }
        guard bound == 0 else {
            let error = SystemError("bind", errno: errno)
            close(fd)
            throw error
        }
        guard listen(fd, backlog) == 0 else {
            let error = SystemError("listen", errno: errno)
            close(fd)
            throw error
        }
        do {
            return try Descriptors.moveAbove(fd)
        } catch {
            close(fd)
            throw error
        }
    }

    /// Fails with EADDRINUSE when anyone else holds `host:port`, including another
    /// SO_REUSEPORT group of the same user, which a reuseport bind would silently join.
    public static func checkAvailable(host: String, port: Int) throws(SystemError) {
        let fd = try bind(host: host, port: port, backlog: 1, reusePort: false)
        close(fd)
    }

    /// The port a bound socket got (for port 0).
    public static func localPort(_ fd: Int32) -> Int {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard ok == 0 else { return 0 }
        let family = storage.ss_family
        return withUnsafeBytes(of: storage) { raw in
            if family == sa_family_t(AF_INET6) {
                return Int(UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port))
            }
            return Int(UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port))
        }
    }

    private struct Address {
        var family: Int32
        var storage: [UInt8]
        var length: socklen_t
    }

    private static func resolve(host: String, port: Int) throws(SystemError) -> Address {
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &result)
        guard status == 0, let info = result else {
            throw SystemError("resolve \(host)", errno: EADDRNOTAVAIL)
        }
        defer { freeaddrinfo(result) }
        let length = info.pointee.ai_addrlen
        let bytes = Array(UnsafeRawBufferPointer(start: info.pointee.ai_addr, count: Int(length)))
        return Address(family: info.pointee.ai_family, storage: bytes, length: length)
    }
}
