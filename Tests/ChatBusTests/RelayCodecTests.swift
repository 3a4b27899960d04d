import ChatProtocol
import NIOCore
import NIOEmbedded
import Testing
@testable import ChatBus

/// The relay link's framing on a real pipeline: what one end writes, the other reads back,
/// however the bytes are cut; a lying length or a garbled frame ends the link with an error,
/// and nothing after it is read.
@Suite struct RelayCodecTests {
    /// What a link's reader handed on, in order.
    private final class Delivered {
        var frames: [RelayFrame] = []
    }

    private let delivered = Delivered()

    private func link() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let delivered = delivered
        try channel.pipeline.syncOperations.addHandler(RelayLinkReader { delivered.frames.append($0) })
        return channel
    }

    private func wire(_ frames: [RelayFrame]) -> [UInt8] {
        frames.flatMap { Array(RelayCodec.encode($0, allocator: ByteBufferAllocator()).readableBytesView) }
    }

    private func framesRead(_ channel: EmbeddedChannel) throws -> [RelayFrame] {
        // Nothing may pass the reader: the frames go to `deliver`, not down the pipeline.
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        defer { delivered.frames.removeAll() }
        return delivered.frames
    }

    @Test func everyFrameComesBackInOrderFromOneWrite() throws {
        let channel = try link()
        try channel.writeInbound(ByteBuffer(bytes: wire(sampleFrames)))
        #expect(try framesRead(channel) == sampleFrames)
        #expect(try channel.finish().isClean)
    }

    @Test func framesCutAtEveryByteStillComeBackWhole() throws {
        let channel = try link()
        let frames = Array(sampleFrames.prefix(6))
        for byte in wire(frames) {
            try channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        #expect(try framesRead(channel) == frames)
        #expect(try channel.finish().isClean)
    }

    @Test func aLengthOverTheMaximumEndsTheLinkBeforeItsBytesArrive() throws {
        let channel = try link()
        let tooLong = UInt32(RelayCodec.maximumFrameBytes + 1)
        #expect(throws: RelayFrameError.self) { try channel.writeInbound(ByteBuffer(bytes: be(tooLong) + [1, 1])) }
        _ = try? channel.finish()
    }

    @Test func aGarbledFrameEndsTheLinkAndNothingAfterItIsRead() throws {
        let channel = try link()
        let garbled: [UInt8] = [1, 99, 0, 0]
        let hello = wire([.hello(worker: "w1")])
        #expect(throws: RelayFrameError.self) {
            try channel.writeInbound(ByteBuffer(bytes: wire([.subscribeAll]) + be(UInt32(garbled.count)) + garbled + hello))
        }
        try channel.writeInbound(ByteBuffer(bytes: hello))
        #expect(try framesRead(channel) == [.subscribeAll])
        _ = try? channel.finish()
    }

    @Test func aFrameCutShortByTheEndOfTheLinkIsNeverDelivered() throws {
        let channel = try link()
        let whole = wire([.hello(worker: "w1")])
        try channel.writeInbound(ByteBuffer(bytes: whole.dropLast()))
        #expect(try framesRead(channel).isEmpty)
        _ = try channel.finish()
        #expect(try framesRead(channel).isEmpty)
    }
}
