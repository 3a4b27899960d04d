import ChatProtocol
import NIOCore
import Testing
@testable import ChatWorker

@Suite struct FrameBytesTests {
    private let allocator = ByteBufferAllocator()

    /// A text frame as RFC 6455 lays it out, from the message's JSON: FIN + text, then the
    /// payload length in 7, 7+16 or 7+64 bits (the server does not mask).
    private func expected(_ message: ServerMessage) -> [UInt8] {
        let payload = Array(message.encoded(allocator).readableBytesView)
        var frame: [UInt8] = [0x81]
        switch payload.count {
        case ..<126: frame.append(UInt8(payload.count))
        case ..<65_536: frame += [126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        default: frame += [127] + (0..<8).reversed().map { UInt8((payload.count >> ($0 * 8)) & 0xFF) }
        }
        return frame + payload
    }

    @Test(arguments: [0, 35, 60, 200, 65_000, 70_000])
    func aMessageFramedInOneBufferIsTheFrameRFC6455Describes(textBytes: Int) {
        let message = ServerMessage.message(RoomMessage(room: "live:42", seq: 7, epoch: "e1", from: "alice",
                                                        text: String(repeating: "x", count: textBytes), ts: 1))
        #expect(Array(FrameBytes.text(message, allocator: allocator).readableBytesView) == expected(message))
        let payload = message.encoded(allocator)
        #expect(Array(FrameBytes.text(payload, allocator: allocator).readableBytesView) == expected(message))
    }

    @Test func everyHeaderLengthBoundary() {
        // Payload sizes around 125/126 and 65,535/65,536 bytes: the JSON around the text is fixed.
        let overhead = ServerMessage.pong(ref: "").encoded(allocator).readableBytes
        for size in [125, 126, 127, 65_535, 65_536, 65_537] where size > overhead {
            let message = ServerMessage.pong(ref: String(repeating: "r", count: size - overhead))
            #expect(message.encoded(allocator).readableBytes == size)
            #expect(Array(FrameBytes.text(message, allocator: allocator).readableBytesView) == expected(message))
        }
    }

    /// The engine writes `hello` behind the 101 from its own memory; the same frame.
    @Test(arguments: [5, 120, 130, 400])
    func helloWrittenIntoMemoryIsTheSameFrame(userBytes: Int) {
        let user = String(repeating: "u", count: userBytes)
        let message = ServerMessage.hello(user: user, conn: "w1-2a", heartbeatSeconds: 30)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { out.deallocate() }
        let length = FrameBytes.writeHello(HelloText(user: user, conn: "w1-2a", heartbeatSeconds: 30), into: out)
        #expect(length.map { Array(out[..<$0]) } == expected(message))
        let short = UnsafeMutableRawBufferPointer(rebasing: out[..<(expected(message).count - 1)])
        #expect(FrameBytes.writeHello(HelloText(user: user, conn: "w1-2a", heartbeatSeconds: 30), into: short) == nil)
    }
}
