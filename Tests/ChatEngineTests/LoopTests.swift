import Glibc
import LoopbackSockets
import Testing
@testable import ChatEngine

/// One loop on this thread and real sockets on 127.0.0.1: the request split over reads, the
/// 101, a publisher's frame delivered to a subscriber, a close answered.
@Suite struct LoopTests {
    final class Harness {
        let loop: Loop
        let probe = PubSubProbe()
        let port: UInt16
        init(config: LoopConfig = LoopConfig()) {
            loop = Loop(config: config)
            loop.application = probe
            let (fd, port) = LoopbackSockets.listener()
            self.port = port
            loop.addListener(fd)
        }

        func connectClient(receiveBuffer: Int32 = 0) -> Int32 {
            LoopbackSockets.client(to: port, receiveBuffer: receiveBuffer)
        }

        func send(_ fd: Int32, _ bytes: [UInt8]) {
            LoopbackSockets.send(fd, bytes)
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
        #expect(h.loop.counters.handshakes == 2 && h.probe.deliveries == 2 && h.loop.counters.closed == 1)
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

    /// Turns the loop and reads whatever `fd` has, without blocking, until `count` bytes,
    /// EOF or reset, or 200 idle turns (about 2 s); returns the bytes and whether the server
    /// closed. The reader first widens its receive buffer: through the 4 KiB one that made
    /// the server's writes back up, megabytes took seconds of window updates per test.
    func drain(_ h: Harness, _ fd: Int32, upTo count: Int) -> (bytes: [UInt8], closed: Bool) {
        var wide: Int32 = 1 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &wide, 4)
        var got: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var idle = 0
        while got.count < count && idle < 200 {
            h.loop.turn(timeout: 10)
            let r = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
            if r == 0 || (r < 0 && errno != EAGAIN) { return (got, true) }
            if r > 0 { got += buffer[..<r]; idle = 0 } else { idle += 1 }
        }
        return (got, false)
    }

    func subscribers(_ h: Harness, _ n: Int, room: String) -> [Int32] {
        (0..<n).map { _ in
            let fd = h.connectClient(receiveBuffer: 4096)
            h.send(fd, Self.request("/sub?room=\(room)"))
            #expect(h.receive(fd, Self.switching.count) == Self.switching)
            return fd
        }
    }

    func publish(_ h: Harness, room: String, frames: Int, size: Int) -> Int32 {
        let pub = h.connectClient()
        h.send(pub, Self.request("/pub?room=\(room)"))
        #expect(h.receive(pub, Self.switching.count) == Self.switching)
        for k in 0..<frames {
            h.send(pub, clientFrame(opcode: Opcode.binary, payload: [UInt8](repeating: UInt8(truncatingIfNeeded: k), count: size)))
            h.loop.turn(timeout: 0)
        }
        return pub
    }

    /// A subscriber that does not read while 8 MiB is published: what its socket would not
    /// take waits in its queue and leaves, in order, once it reads. (Its 4 KiB receive buffer
    /// and the server's send buffer, at most tcp_wmem's 4 MiB, hold far less than that.)
    @Test func queuedOnEAGAINThenDrainedInOrder() {
        var config = LoopConfig()
        config.maxQueuedBytes = 32 << 20
        let h = Harness(config: config)
        let slow = subscribers(h, 1, room: "q")[0]
        let size = 32 * 1024, frame = size + 4, frames = 256
        let pub = publish(h, room: "q", frames: frames, size: size)
        #expect(h.loop.counters.queued > 0)
        let (got, closed) = drain(h, slow, upTo: frames * frame)
        #expect(!closed && got.count == frames * frame)
        for k in 0..<frames where got.count == frames * frame {
            #expect(Array(got[(k * frame)..<(k * frame + 4)]) == [0x82, 126, 0x80, 0x00] && got[k * frame + 4] == UInt8(truncatingIfNeeded: k), "frame \(k)")
        }
        #expect(h.loop.counters.slowConsumers == 0)
        close(slow); close(pub)
    }

    /// The first write since a flush goes out; later ones wait for the flush and go out
    /// together, in order (a member's frames of one tick: two sends, not one each).
    @Test func writesAfterTheFirstWaitForTheFlush() {
        let h = Harness()
        let client = subscribers(h, 1, room: "w")[0]
        guard let server = (0..<Int32(h.loop.capacity)).first(where: { h.loop.conns[Int($0)].state == Connection.open }) else {
            Issue.record("no open connection on the loop")
            return
        }
        func write(_ bytes: [UInt8]) { bytes.withUnsafeBytes { h.loop.writeOncePerFlush(server, $0.baseAddress!, $0.count) } }
        func received() -> [UInt8] {
            usleep(20_000)
            var buffer = [UInt8](repeating: 0, count: 256)
            let r = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
            return r > 0 ? Array(buffer[..<r]) : []
        }
        write([1, 2, 3])
        write([4, 5])
        write([6])
        #expect(h.loop.queuedBytes(server) == 3)
        #expect(received() == [1, 2, 3])
        h.loop.flush(server)
        #expect(h.loop.queuedBytes(server) == 0)
        #expect(received() == [4, 5, 6])
        write([7])
        #expect(h.loop.queuedBytes(server) == 0, "after a flush the first write goes straight out again")
        #expect(received() == [7])
        close(client)
    }

    /// One that never reads is dropped once its queue passes the limit.
    @Test func slowConsumerDropped() {
        var config = LoopConfig()
        config.maxQueuedBytes = 64 * 1024
        let h = Harness(config: config)
        let stuck = subscribers(h, 1, room: "s")[0]
        let pub = publish(h, room: "s", frames: 128, size: 32 * 1024)
        #expect(h.loop.counters.slowConsumers == 1)
        let (got, closed) = drain(h, stuck, upTo: Int.max)
        #expect(closed && got.count < 128 * (32 * 1024 + 4))
        close(stuck); close(pub)
    }
}
