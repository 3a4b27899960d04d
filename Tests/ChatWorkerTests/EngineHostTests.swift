import ChatEngine
import Glibc
import LoopbackSockets
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import ChatWorker

/// The engine's events must wake the worker's NIO thread however it is watched: a request
/// and the bytes after it each reach the application, also after the thread went back to
/// sleep in NIO's `epoll_wait` between them (the watch was re-armed).
@Suite struct EngineHostTests {
    final class Counter: LoopApplication, Sendable {
        let requests = NIOLockedValueBox(0)
        let bytes = NIOLockedValueBox(0)

        func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse) {
            guard case .request(let request) = parse else { return loop.refuse(fd, "HTTP/1.1 400 Bad Request\r\n\r\n") }
            _ = loop.upgrade(fd, request, in: UnsafeRawBufferPointer(bytes))
            requests.withLockedValue { $0 += 1 }
        }

        func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
            bytes.withLockedValue { $0 += count }
            return count
        }

        func closed(_ loop: Loop, fd: Int32) {}
        func acceptFailed(_ loop: Loop, listener: Int32, errno: Int32) {}
    }

    static let request = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

    /// io_uring is there unless the kernel switched it off (the machines this runs on have it).
    static var ringExpected: Bool {
        guard let file = fopen("/proc/sys/kernel/io_uring_disabled", "r") else { return true }
        defer { fclose(file) }
        return fgetc(file) == Int32(UInt8(ascii: "0"))
    }

    @Test(arguments: [true, false])
    func everyBurstWakesTheThread(allowRing: Bool) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let eventLoop = group.next()
        let counter = Counter()
        let (listener, port) = LoopbackSockets.listener()
        defer { close(listener) }
        let (watch, host) = try eventLoop.submit {
            let loop = Loop()
            loop.application = counter
            loop.addListener(listener)
            let host = EngineHost(loop: loop, application: counter, eventLoop: eventLoop)
            let bound = NIOLoopBound(host, eventLoop: eventLoop)
            return host.start(allowRing: allowRing).map { ($0, bound) }
        }.flatMap { $0 }.wait()
        #expect(watch == (allowRing && Self.ringExpected ? .ring : .thread))

        var clients: [Int32] = []
        defer { clients.forEach { close($0) } }
        for round in 1...3 {
            usleep(30_000)  // the thread is asleep again
            let client = LoopbackSockets.client(to: port)
            clients.append(client)
            LoopbackSockets.send(client, Array(Self.request.utf8))
            #expect(Self.waitFor { counter.requests.withLockedValue { $0 } == round }, "request \(round) was not seen")
            usleep(30_000)
            LoopbackSockets.send(client, [1, 2, 3, 4, 5])
            #expect(Self.waitFor { counter.bytes.withLockedValue { $0 } == 5 * round }, "bytes \(round) were not seen")
        }
        _ = host
    }

    static func waitFor(_ done: () -> Bool) -> Bool {
        for _ in 0..<200 {
            if done() { return true }
            usleep(10_000)
        }
        return done()
    }
}
