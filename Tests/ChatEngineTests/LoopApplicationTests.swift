import Glibc
import LoopbackSockets
import Testing
@testable import ChatEngine

/// The loop's contract with its application: a request handed off leaves the loop open and
/// untouched; a request decided later keeps what the client sent meanwhile and gives it to
/// `input` once upgraded; the subprotocol is confirmed in the 101.
@Suite struct LoopApplicationTests {
    final class Recorder: LoopApplication {
        enum Plan { case handOff, decideLater, hold, upgrade }
        var plan = Plan.upgrade
        var handedOff: [(fd: Int32, bytes: [UInt8])] = []
        var deciding: [(fd: Int32, request: UpgradeRequest, head: [UInt8])] = []
        var inputs: [[UInt8]] = []
        var closed: [Int32] = []

        func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse) {
            if plan == .handOff {
                handedOff.append((fd, Array(bytes)))
                return loop.handOff(fd)
            }
            guard case .request(let request) = parse else { return loop.refuse(fd, "HTTP/1.1 400 Bad Request\r\n\r\n") }
            switch plan {
            case .handOff:
                break
            case .decideLater:
                deciding.append((fd, request, Array(bytes[..<request.headLength])))
                loop.decideLater(fd)
            case .hold:
                deciding.append((fd, request, Array(bytes[..<request.headLength])))
                loop.hold(fd, request, in: UnsafeRawBufferPointer(bytes))
            case .upgrade:
                loop.upgrade(fd, request, in: UnsafeRawBufferPointer(bytes), subprotocol: "chatgw.v1")
            }
        }

        func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
            inputs.append(Array(UnsafeRawBufferPointer(start: p, count: count)))
            return count
        }

        func closed(_ loop: Loop, fd: Int32) { closed.append(fd) }
        func acceptFailed(_ loop: Loop, listener: Int32, errno: Int32) {}
    }

    final class Harness {
        let loop: Loop
        let app = Recorder()
        let port: UInt16
        let listener: Int32

        init(readOnAccept: Bool = false) {
            var config = LoopConfig()
            config.readOnAccept = readOnAccept
            loop = Loop(config: config)
            let (fd, port) = LoopbackSockets.listener()
            listener = fd
            self.port = port
            loop.application = app
            loop.addListener(fd)
        }

        deinit { close(listener) }

        func connect() -> Int32 {
            LoopbackSockets.client(to: port)
        }

        func send(_ fd: Int32, _ bytes: [UInt8]) {
            LoopbackSockets.send(fd, bytes)
        }

        /// Turns the loop until `done` or 2 s.
        func turn(until done: () -> Bool) {
            for _ in 0..<40 {
                if done() { return }
                loop.turn(timeout: 50)
            }
        }

        func receive(_ fd: Int32) -> String {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let r = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
            return r > 0 ? String(decoding: buffer[..<r], as: UTF8.self) : ""
        }
    }

    static let request = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

    @Test func aHandedOffDescriptorStaysOpenAndLeavesTheLoop() {
        let h = Harness()
        h.app.plan = .handOff
        let client = h.connect()
        h.send(client, Array("POST /api HTTP/1.1\r\nContent-Length: 4\r\n\r\nbo".utf8))
        h.turn { !h.app.handedOff.isEmpty }
        guard let taken = h.app.handedOff.first else { Issue.record("not handed off"); return }
        #expect(String(decoding: taken.bytes, as: UTF8.self).hasSuffix("\r\n\r\nbo"))
        #expect(h.loop.counters.handedOff == 1)
        // The rest of the body is for the new owner: the loop reads nothing more of it.
        h.send(client, Array("dy".utf8))
        h.turn { false }
        #expect(h.app.inputs.isEmpty && h.app.closed.isEmpty)
        var buffer = [UInt8](repeating: 0, count: 16)
        #expect(recv(taken.fd, &buffer, 16, Int32(MSG_DONTWAIT)) == 2)
        // Still the new owner's to write to and close.
        #expect(Glibc.send(taken.fd, "ok", 2, 0) == 2)
        #expect(h.receive(client) == "ok")
        close(taken.fd)
        close(client)
    }

    /// Also when the request is read right after accept (deferred accept), before the
    /// connection is registered with epoll: it must be registered all the same.
    @Test(arguments: [false, true])
    func aRequestDecidedLaterKeepsWhatCameMeanwhile(readOnAccept: Bool) {
        let h = Harness(readOnAccept: readOnAccept)
        h.app.plan = .decideLater
        let client = h.connect()
        h.send(client, Array(Self.request.utf8) + [1, 2])
        usleep(20_000)  // the request is there before the accept
        h.turn { !h.app.deciding.isEmpty }
        h.send(client, [3])
        h.turn { false }
        #expect(h.app.inputs.isEmpty)
        guard let pending = h.app.deciding.first else { Issue.record("not deciding"); return }
        #expect(Array(h.loop.keptInput(pending.fd)) == [1, 2, 3])
        pending.head.withUnsafeBytes { _ = h.loop.upgrade(pending.fd, pending.request, in: $0) }
        h.loop.resumeInput(pending.fd)
        #expect(h.app.inputs == [[1, 2, 3]])
        #expect(h.receive(client).hasPrefix("HTTP/1.1 101 "))
        close(client)
        h.turn { !h.app.closed.isEmpty }
        #expect(h.app.closed == [pending.fd])
    }

    /// A held 101 (`hold`) waits in the connection's queue with every write behind it, none
    /// of it sent, while the client's bytes wait unread; `release` sends all of it in one
    /// write, and the connection is open.
    @Test func aHeldUpgradeLeavesWithWhatWasWrittenBehindIt() {
        let h = Harness(readOnAccept: true)
        h.app.plan = .hold
        let client = h.connect()
        h.send(client, Array(Self.request.utf8) + [7])
        h.turn { !h.app.deciding.isEmpty }
        guard let pending = h.app.deciding.first else { Issue.record("not held"); return }
        #expect(h.loop.isHolding(pending.fd))
        h.loop.write(pending.fd, "hello", 5)
        h.loop.writeOncePerFlush(pending.fd, "+joined", 7)
        h.loop.flush(pending.fd)
        h.send(client, [8])
        h.turn { false }
        #expect(h.receive(client) == "", "nothing leaves before release")
        #expect(h.app.inputs.isEmpty)
        #expect(Array(h.loop.keptInput(pending.fd)) == [7, 8])
        #expect(h.loop.release(pending.fd))
        #expect(!h.loop.isHolding(pending.fd))
        h.loop.resumeInput(pending.fd)
        #expect(h.app.inputs == [[7, 8]])
        let answer = h.receive(client)
        #expect(answer.hasPrefix("HTTP/1.1 101 "))
        #expect(answer.hasSuffix("\r\n\r\nhello+joined"))
        #expect(h.loop.counters.handshakes == 1)
        h.loop.write(pending.fd, "live", 4)
        #expect(h.receive(client) == "live", "open: a write goes straight out")
        #expect(!h.loop.release(pending.fd), "released once")
        close(client)
    }

    @Test func theSubprotocolIsConfirmed() {
        let h = Harness()
        let client = h.connect()
        h.send(client, Array(Self.request.utf8))
        var answer = ""
        h.turn { answer = h.receive(client); return !answer.isEmpty }
        #expect(answer.contains("\r\nSec-WebSocket-Protocol: chatgw.v1\r\n\r\n"))
        #expect(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"))
        close(client)
    }
}
