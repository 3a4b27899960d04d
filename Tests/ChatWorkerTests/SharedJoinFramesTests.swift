import ChatBus
import ChatProtocol
import NIOCore
import Testing
@testable import ChatWorker

@Suite struct SharedJoinFramesTests {
    private let allocator = ByteBufferAllocator()
    private let answer = JoinResult(
        room: RoomSnapshot(name: "r", epoch: "e2", seq: 10, members: 3),
        replay: (9...10).map { RoomMessage(room: "r", seq: $0, epoch: "e2", from: "u", text: "t\($0)", ts: $0) },
        gap: Gap(from: 0, to: 0, epoch: "e2"))

    /// What a member wrote before the frames were shared: each message framed on its own.
    private func framedOneByOne(_ reply: JoinReply) -> [UInt8] {
        reply.messages().flatMap { Array(FrameBytes.text($0, allocator: allocator).readableBytesView) }
    }

    @Test func everyMemberWritesWhatItWouldHaveEncodedItself() {
        let shared = SharedJoinFrames()
        for ref in [nil, "a", nil, "b"] as [String?] {
            let reply = JoinReply(room: "r", answer: answer, ref: ref)
            let following = shared.following(reply, allocator: allocator)
            let written = Array(shared.joined(reply, allocator: allocator).readableBytesView) + Array(following.bytes.readableBytesView)
            #expect(written == framedOneByOne(reply))
            #expect(following.frames == 3)  // the epoch's gap, then two messages
            #expect(following.messages == 2)
        }
    }

    @Test func theGroupEncodesOnce() {
        let shared = SharedJoinFrames()
        let first = JoinReply(room: "r", answer: answer, ref: nil)
        // A later member's reply says something else: it still gets the group's frames,
        // which shows they were not encoded again (every member of a group has the same answer).
        let later = JoinReply(room: "r", answer: JoinResult(room: RoomSnapshot(name: "r", epoch: "e3", seq: 1, members: 1),
                                                           replay: [], gap: nil), ref: nil)
        let firstBytes = (shared.joined(first, allocator: allocator), shared.following(first, allocator: allocator).bytes)
        #expect(shared.joined(later, allocator: allocator) == firstBytes.0)
        #expect(shared.following(later, allocator: allocator).bytes == firstBytes.1)
        #expect(shared.following(later, allocator: allocator).frames == 3)
    }
}
