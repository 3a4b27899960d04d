import Glibc
import Testing

/// Real sockets on 127.0.0.1 for the tests of the epoll loop and of what turns it.
public enum LoopbackSockets {
    /// A non-blocking listening socket on a free port.
    public static func listener() -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        listen(fd, 16)
        return (fd, UInt16(bigEndian: addr.sin_port))
    }

    /// A blocking client connected to `port`. `receiveBuffer`: a small SO_RCVBUF, set
    /// before connecting, makes the server's writes to this client hit EAGAIN early.
    public static func client(to port: UInt16, receiveBuffer: Int32 = 0) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var size = receiveBuffer
        if size > 0 { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        #expect(r == 0)
        return fd
    }

    public static func send(_ fd: Int32, _ bytes: [UInt8]) {
        #expect(bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, $0.count, 0) } == bytes.count)
    }
}
