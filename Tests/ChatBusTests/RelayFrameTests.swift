import ChatProtocol
import NIOCore
import Testing
@testable import ChatBus

/// SplitMix64: a small deterministic generator, so a fuzz failure reproduces.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func encodedBytes(_ frame: RelayFrame) -> [UInt8] {
    var buffer = ByteBuffer()
    frame.encode(into: &buffer)
    return Array(buffer.readableBytesView)
}

func decodeBytes(_ bytes: [UInt8]) throws(RelayFrameError) -> RelayFrame {
    var buffer = ByteBuffer(bytes: bytes)
    return try RelayFrame.decode(&buffer)
}

/// Big-endian bytes of an integer, for hand-built frames.
func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}

func relayString(_ text: String) -> [UInt8] {
    be(UInt32(text.utf8.count)) + Array(text.utf8)
}

let sampleMessages = [
    RoomMessage(room: "live:42", seq: 117, epoch: "e9c1", from: "bob", text: "hi", ts: 1_764_000_000_000),
    RoomMessage(room: "live:42", seq: 118, epoch: "e9c1", from: "carol", text: "héllo 😀 \"q\"\n\u{0}", ts: 1_764_000_000_150),
    RoomMessage(room: "live:42", seq: 119, epoch: "e9c1", from: "", text: "", ts: 0),
]

/// One of every frame case, with the optional parts both absent and present.
let sampleFrames: [RelayFrame] = [
    .hello(worker: "worker-1"),
    .hello(worker: ""),
    .join(request: 1, room: "live:42", since: nil, epoch: nil, history: 0, members: 1),
    .join(request: 2, room: "live:42", since: 0, epoch: "e9c1", history: 100, members: 3),
    .join(request: UInt32.max, room: "r", since: 117, epoch: "e9c1", history: 5, members: 0),
    .join(request: 4, room: "r", since: Int(Int64.max), epoch: nil, history: 0, members: Int(UInt32.max)),
    .leave(room: "live:42", members: 0),
    .leave(room: "r", members: 7),
    .publish(request: 9, room: "live:42", from: "alice", text: "hello"),
    .publish(request: 10, room: "r", from: "ü", text: "日本語 😀 \u{1}\u{7F}\"\\"),
    .publish(request: 11, room: "r", from: "a", text: ""),
    .fetch(request: 12, room: "r", before: nil, limit: 50),
    .fetch(request: 13, room: "r", before: HistoryPosition(epoch: "e9c1", seq: 0), limit: 1),
    .fetch(request: 14, room: "r", before: HistoryPosition(epoch: "e9c1", seq: 40), limit: 200),
    .joined(request: 15, room: RoomSnapshot(name: "live:42", epoch: "e9c1", seq: 0, members: 1), replay: [], gap: nil),
    .joined(request: 16, room: RoomSnapshot(name: "live:42", epoch: "e9c1", seq: 119, members: 5210), replay: sampleMessages, gap: nil),
    .joined(request: 17, room: RoomSnapshot(name: "live:42", epoch: "e9c1", seq: 119, members: 2), replay: sampleMessages,
            gap: Gap(from: 3, to: 116, epoch: "e9c1")),
    .joined(request: 18, room: RoomSnapshot(name: "live:42", epoch: "e9c1", seq: 0, members: 2), replay: [],
            gap: Gap(from: 0, to: 0, epoch: "e9c1")),
    .message(sampleMessages[0]),
    .message(sampleMessages[1]),
    .message(RoomMessage(room: "r", seq: Int(Int64.max), epoch: "e", from: "u", text: String(repeating: "x", count: 70_000), ts: 1)),
    .published(request: 19, room: "live:42", seq: 120, epoch: "e9c1"),
    .fetched(request: 20, room: "live:42", messages: [], more: false),
    .fetched(request: 21, room: "live:42", messages: sampleMessages, more: true),
]

@Suite struct RelayFrameRoundTripTests {
    @Test(arguments: sampleFrames)
    func roundTrip(_ frame: RelayFrame) throws {
        let bytes = encodedBytes(frame)
        #expect(bytes.first == RelayFrame.version)
        #expect(try decodeBytes(bytes) == frame)
    }

    @Test func encodeAppendsAndDecodeReadsFromTheReaderIndex() throws {
        var buffer = ByteBuffer(string: "junk")
        RelayFrame.hello(worker: "w").encode(into: &buffer)
        buffer.moveReaderIndex(forwardBy: 4)
        let copy = buffer
        #expect(try RelayFrame.decode(&buffer) == .hello(worker: "w"))
        #expect(buffer == copy)
    }

    @Test func codecEncodesTheSameBytesBehindTheirLength() {
        let frame = sampleFrames[16]
        let buffer = RelayCodec.encode(frame, allocator: ByteBufferAllocator())
        let body = encodedBytes(frame)
        #expect(Array(buffer.readableBytesView) == be(UInt32(body.count)) + body)
    }

    // The wire layout itself, so both ends of a mixed-version deployment agree.

    @Test func helloLayout() {
        #expect(encodedBytes(.hello(worker: "w1")) == [1, 1] + be(UInt32(2)) + Array("w1".utf8))
    }

    @Test func joinLayoutWritesAbsentAsMinusOneAndEmpty() {
        let bytes = encodedBytes(.join(request: 7, room: "r", since: nil, epoch: nil, history: 2, members: 3))
        #expect(bytes == [1, 2] + be(UInt32(7)) + relayString("r") + be(Int64(-1)) + relayString("") + be(UInt32(2)) + be(UInt32(3)))
    }

    @Test func messageLayout() {
        let message = RoomMessage(room: "r", seq: 5, epoch: "e", from: "u", text: "t", ts: 9)
        #expect(encodedBytes(.message(message))
            == [1, 102] + relayString("r") + be(Int64(5)) + relayString("e") + relayString("u") + relayString("t") + be(Int64(9)))
    }

    @Test func negativeOptionalIntegersDecodeAsAbsent() throws {
        let bytes: [UInt8] = [1, 2] + be(UInt32(7)) + relayString("r") + be(Int64(-42)) + relayString("e") + be(UInt32(0)) + be(UInt32(1))
        #expect(try decodeBytes(bytes) == .join(request: 7, room: "r", since: nil, epoch: "e", history: 0, members: 1))
    }

    @Test func anyNonZeroMoreByteIsTrue() throws {
        let bytes: [UInt8] = [1, 104] + be(UInt32(1)) + relayString("r") + [0x7F] + be(UInt32(0))
        #expect(try decodeBytes(bytes) == .fetched(request: 1, room: "r", messages: [], more: true))
    }
}

@Suite struct RelayFrameGarbageTests {
    private func expectThrows(_ bytes: [UInt8], _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: RelayFrameError.self, comment, sourceLocation: sourceLocation) { try decodeBytes(bytes) }
    }

    @Test func emptyBuffer() {
        expectThrows([])
    }

    @Test(arguments: [UInt8(0), 2, 0xFF])
    func wrongVersion(_ version: UInt8) {
        var bytes = encodedBytes(.hello(worker: "w"))
        bytes[0] = version
        expectThrows(bytes)
        expectThrows([version])
    }

    @Test(arguments: [UInt8(0), 6, 100, 106, 0xFF])
    func unknownType(_ type: UInt8) {
        expectThrows([1, type])
        expectThrows([1, type] + relayString("w"))
    }

    @Test(arguments: sampleFrames.filter { encodedBytes($0).count < 10_000 })
    func everyTruncationThrows(_ frame: RelayFrame) {
        let bytes = encodedBytes(frame)
        for length in 0..<bytes.count {
            expectThrows(Array(bytes[..<length]), "prefix of \(length) of \(bytes.count) bytes")
        }
    }

    @Test(arguments: sampleFrames)
    func trailingBytesThrow(_ frame: RelayFrame) {
        let bytes = encodedBytes(frame)
        expectThrows(bytes + [0])
        expectThrows(bytes + [1, 1] + relayString("w"))
    }

    @Test(arguments: [UInt32(2), 100, 0x7FFF_FFFF, UInt32.max])
    func stringLongerThanTheFrame(_ length: UInt32) {
        expectThrows([1, 1] + be(length) + [0x61])
        // Inside a message, too.
        expectThrows([1, 102] + relayString("r") + be(Int64(1)) + be(length) + Array("epoch".utf8))
    }

    @Test(arguments: [UInt32.max, 0x8000_0000, 1_000_000, 2])
    func messageCountLargerThanTheFrame(_ count: UInt32) {
        // `fetched` and `joined` carry a message list.
        let oneMessage = be(Int64(1)) + relayString("e") + relayString("u") + relayString("t") + be(Int64(0))
        expectThrows([1, 104] + be(UInt32(1)) + relayString("r") + [0] + be(count) + oneMessage)
        let joinedHead: [UInt8] = [1, 101] + be(UInt32(1)) + relayString("r") + relayString("e") + be(Int64(1)) + be(UInt32(1))
            + be(Int64(-1)) + be(Int64(-1)) + relayString("")
        expectThrows(joinedHead + be(count) + oneMessage)
        // The same frames with the right count decode.
        #expect(throws: Never.self) { try decodeBytes([1, 104] + be(UInt32(1)) + relayString("r") + [0] + be(UInt32(1)) + oneMessage) }
        #expect(throws: Never.self) { try decodeBytes(joinedHead + be(UInt32(1)) + oneMessage) }
    }

    static let invalidUTF8: [[UInt8]] = [
        [0xFF], [0xFE, 0xFF], [0x80], [0x61, 0xC3], [0xE2, 0x82], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xF8, 0x88, 0x80, 0x80, 0x80],
        // A truncated four-byte sequence: repaired, it is one U+FFFD of the same three bytes' length.
        [0xF0, 0x9F, 0x98], [0x61, 0xF0, 0x9F, 0x98, 0x62],
    ]

    @Test(arguments: invalidUTF8)
    func invalidUTF8Throws(_ bad: [UInt8]) {
        expectThrows([1, 1] + be(UInt32(bad.count)) + bad)
        expectThrows([1, 5] + be(UInt32(3)) + relayString("r") + be(UInt32(bad.count)) + bad + be(Int64(1)) + be(UInt32(5)))
        expectThrows([1, 102] + relayString("r") + be(Int64(1)) + relayString("e") + relayString("u")
            + be(UInt32(bad.count)) + bad + be(Int64(0)))
    }

    @Test func randomBuffersThrowOrDecode() throws {
        var random = SeededGenerator(seed: 0xC0FFEE)
        let types: [UInt8] = [1, 2, 3, 4, 5, 101, 102, 103, 104, 105]
        var decoded = 0
        for iteration in 0..<2_000 {
            var bytes = (0..<Int.random(in: 0...96, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            // Most buffers get a valid header and small lengths, so the fuzz reaches the bodies.
            if iteration % 4 != 0, bytes.count >= 2 {
                bytes[0] = 1
                bytes[1] = types.randomElement(using: &random)!
                for index in bytes.indices.dropFirst(2) where Bool.random(using: &random) && bytes[index] > 8 { bytes[index] = 0 }
            }
            guard let frame = try? decodeBytes(bytes) else { continue }  // refused, as most should be
            decoded += 1
            #expect(bytes.first == RelayFrame.version, "decoded \(bytes)")
            // Whatever decodes must re-encode to the same frame.
            #expect(try decodeBytes(encodedBytes(frame)) == frame, "\(bytes)")
        }
        #expect(decoded < 2_000)
    }

    @Test func mutatedFramesThrowOrDecode() throws {
        var random = SeededGenerator(seed: 42)
        let valid = sampleFrames.map(encodedBytes).filter { $0.count < 1_000 }
        for _ in 0..<2_000 {
            var bytes = valid.randomElement(using: &random)!
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                switch Int.random(in: 0..<4, using: &random) {
                case 0: bytes[Int.random(in: 0..<bytes.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
                case 1: bytes[Int.random(in: 0..<bytes.count, using: &random)] ^= 1 << UInt8.random(in: 0..<8, using: &random)
                case 2: bytes.insert(UInt8.random(in: 0...255, using: &random), at: Int.random(in: 0...bytes.count, using: &random))
                default: if bytes.count > 1 { bytes.remove(at: Int.random(in: 0..<bytes.count, using: &random)) }
                }
            }
            if let frame = try? decodeBytes(bytes) {
                #expect(try decodeBytes(encodedBytes(frame)) == frame, "\(bytes)")
            }
        }
    }
}
