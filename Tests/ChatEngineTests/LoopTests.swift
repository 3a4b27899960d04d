import Glibc
import Testing
@testable import ChatEngine

/// One loop on this thread and real sockets on 127.0.0.1: the request split over reads, the
/// 101, a publisher's frame delivered to a subscriber, a close answered.
@Suite struct LoopTests {
    final class Harness {
        let loop = Loop()
        let port: UInt16
        init() {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
            _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
            listen(fd, 16)
            port = UInt16(bigEndian: addr.sin_port)
            loop.addListener(fd)
        }

        func connectClient() -> Int32 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = port.bigEndian
            addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
            let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            #expect(r == 0)
            return fd
        }

        func send(_ fd: Int32, _ bytes: [UInt8]) {
            #expect(bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, $0.count, 0) } == bytes.count)
        }

        /// Turns the loop until `fd` has received `count` bytes (or EOF, or 2 s).
        func receive(_ fd: Int32, _ count: Int) -> [UInt8] {
            var got: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            for _ in 0..<40 where got.count < count {
                loop.turn(timeout: 50)
                let r = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, min($0.count, count - got.count), Int32(MSG_DONTWAIT)) }
                if r == 0 { break }
                if r > 0 { got += buffer[..<r] }
            }
            return got
        }
    }

    static func request(_ target: String) -> [UInt8] {
        Array("GET \(target) HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8)
    }

    static let switching = Array("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".utf8)

    @Test func upgradeSplitOverReadsThenPublishAndClose() {
        let h = Harness()
        let sub = h.connectClient()
        let request = Self.request("/sub?room=a")
        h.send(sub, Array(request[..<20]))
        #expect(h.receive(sub, 1).isEmpty)  // accepted, half a request: nothing to answer yet
        h.send(sub, Array(request[20..<70]))
        #expect(h.receive(sub, 1).isEmpty)
        h.send(sub, Array(request[70...]))
        #expect(h.receive(sub, Self.switching.count) == Self.switching)

        // A publisher whose request and first frame arrive in one read.
        let pub = h.connectClient()
        h.send(pub, Self.request("/pub?room=a") + clientFrame(opcode: Opcode.text, payload: Array("hi".utf8)))
        #expect(h.receive(pub, Self.switching.count) == Self.switching)
        #expect(h.receive(sub, 4) == [0x81, 2, 0x68, 0x69])
        // A frame split over two reads, 300 bytes: the 16-bit length form.
        let long = clientFrame(opcode: Opcode.text, payload: [UInt8](repeating: 0x61, count: 300))
        h.send(pub, Array(long[..<5]))
        #expect(h.receive(sub, 1).isEmpty)
        h.send(pub, Array(long[5...]))
        #expect(h.receive(sub, 304) == [0x81, 126, 1, 44] + [UInt8](repeating: 0x61, count: 300))

        // Ping answered with its payload; close answered and the socket closed.
        h.send(sub, clientFrame(opcode: Opcode.ping, payload: [7, 8]))
        #expect(h.receive(sub, 4) == [0x8A, 2, 7, 8])
        h.send(sub, clientFrame(opcode: Opcode.close, payload: [0x03, 0xE8]))
        #expect(h.receive(sub, 5) == [0x88, 2, 0x03, 0xE8])
        #expect(h.loop.counters.handshakes == 2 && h.loop.counters.deliveries == 2 && h.loop.counters.closed == 1)
        close(sub)
        close(pub)
    }

    @Test func badRequestsAreRefused() {
        let h = Harness()
        let a = h.connectClient()
        h.send(a, Array("GET /sub?room=a HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(String(decoding: h.receive(a, 1000), as: UTF8.self).hasPrefix("HTTP/1.1 400 "))
        let b = h.connectClient()
        h.send(b, Self.request("/other?room=a"))
        #expect(String(decoding: h.receive(b, 1000), as: UTF8.self).hasPrefix("HTTP/1.1 404 "))
        let c = h.connectClient()
        h.send(c, Self.request("/sub"))
        #expect(String(decoding: h.receive(c, 1000), as: UTF8.self).hasPrefix("HTTP/1.1 400 "))
        #expect(h.loop.counters.handshakes == 0)
        close(a); close(b); close(c)
    }
}
