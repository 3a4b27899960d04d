import NIOCore

/// The WebSocket frames of one bus answer to a group of identical joins (`MemberRequests`),
/// encoded by the group's first member and written as they are by every other.
///
/// After a reload thousands of viewers rejoin one room from the same point within a tick:
/// each would otherwise encode the same `joined` and the same missed messages. A `joined`
/// that carries a member's `ref` is that member's own; what follows it is shared.
final class SharedJoinFrames {
    struct Following {
        var bytes: ByteBuffer
        var frames: Int
        var messages: Int
    }

    private var joinedWithoutRef: ByteBuffer?
    private var following: Following?

    func joined(_ reply: JoinReply, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard reply.ref == nil else { return FrameBytes.text(reply.joined, allocator: allocator) }
        if let joinedWithoutRef { return joinedWithoutRef }
        let frame = FrameBytes.text(reply.joined, allocator: allocator)
        joinedWithoutRef = frame
        return frame
    }

    /// Everything after `joined`, back to back in one buffer.
    func following(_ reply: JoinReply, allocator: ByteBufferAllocator) -> Following {
        if let following { return following }
        let messages = reply.following()
        var bytes = allocator.buffer(capacity: 0)
        var delivered = 0
        for message in messages {
            if case .message = message { delivered += 1 }
            var frame = FrameBytes.text(message, allocator: allocator)
            bytes.writeBuffer(&frame)
        }
        let made = Following(bytes: bytes, frames: messages.count, messages: delivered)
        following = made
        return made
    }
}
