#if canImport(Glibc)
import Glibc
#endif
import ChatProtocol
import NIOCore

// The relay wire format. Each frame on the Unix socket is
//
//     u32 length | u8 version | u8 type | body
//
// where `length` counts everything after itself (RelayCodec writes and reads it with the
// frame). Strings are u32 length + UTF-8 bytes; integers are big-endian; an optional
// integer is -1 for "absent". The version byte lets a newer relay refuse an older worker
// (or garbage) with a clear log line instead of misreading it.
//
// Joining is one atomic step at the relay (count the member, read the room's state and
// replay, all before any later message of that room is forwarded), so a worker never
// has to stitch a subscription and a history fetch together at a seam.

/// Worker -> relay requests and relay -> worker answers.
public enum RelayFrame: Equatable, Sendable {
    // worker -> relay
    /// First frame of a link: who is speaking.
    case hello(worker: String)
    /// `members` more local members in `room`; answer: `joined` with the same `request`.
    /// `since`/`epoch`: replay what came after; `history`: also the last N messages.
    case join(request: UInt32, room: String, since: Int?, epoch: String?, history: Int, members: Int)
    /// `members` fewer local members in `room` (0 left: the worker stops receiving it).
    case leave(room: String, members: Int)
    /// Sequence and forward a message; answer: `published`.
    case publish(request: UInt32, room: String, from: String, text: String)
    /// Scroll-back; answer: `fetched`.
    case fetch(request: UInt32, room: String, before: HistoryPosition?, limit: Int)
    /// A room's state without joining it; answer: `joined` with no replay.
    case info(request: UInt32, room: String)
    /// Send this link every message of every room (the archiver).
    case subscribeAll
    /// The names of every room the relay knows; answer: `roomList`.
    case listRooms(request: UInt32)

    // relay -> worker
    case joined(request: UInt32, room: RoomSnapshot, replay: [RoomMessage], gap: Gap?)
    case message(RoomMessage)
    case published(request: UInt32, room: String, seq: Int, epoch: String)
    case fetched(request: UInt32, room: String, messages: [RoomMessage], more: Bool)
    case roomList(request: UInt32, rooms: [String])

    public static let version: UInt8 = 1
}

/// A room's state at one instant.
public struct RoomSnapshot: Equatable, Sendable {
    public var name: String
    public var epoch: String
    public var seq: Int
    public var members: Int

    public init(name: String, epoch: String, seq: Int, members: Int) {
        self.name = name
        self.epoch = epoch
        self.seq = seq
        self.members = members
    }
}

/// A seq range the history can no longer replay, in `epoch`.
public struct Gap: Equatable, Sendable {
    public var from: Int
    public var to: Int
    public var epoch: String

    public init(from: Int, to: Int, epoch: String) {
        self.from = from
        self.to = to
        self.epoch = epoch
    }
}

public struct RelayFrameError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}

private enum FrameType: UInt8 {
    case hello = 1, join, leave, publish, fetch, info, subscribeAll, listRooms
    case joined = 101, message, published, fetched
    // 105 was `failed`, which no relay ever sent; a frame of that type is refused.
    case roomList = 106
}

extension RelayFrame {
    /// Appends the frame (version, type, body; no length prefix) to `buffer`.
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeInteger(Self.version)
        switch self {
        case .hello(let worker):
            buffer.writeInteger(FrameType.hello.rawValue)
            buffer.writeRelayString(worker)
        case .join(let request, let room, let since, let epoch, let history, let members):
            buffer.writeInteger(FrameType.join.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
            buffer.writeInteger(Int64(since ?? -1))
            buffer.writeRelayString(epoch ?? "")
            buffer.writeInteger(UInt32(history))
            buffer.writeInteger(UInt32(members))
        case .leave(let room, let members):
            buffer.writeInteger(FrameType.leave.rawValue)
            buffer.writeRelayString(room)
            buffer.writeInteger(UInt32(members))
        case .publish(let request, let room, let from, let text):
            buffer.writeInteger(FrameType.publish.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
            buffer.writeRelayString(from)
            buffer.writeRelayString(text)
        case .fetch(let request, let room, let before, let limit):
            buffer.writeInteger(FrameType.fetch.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
            buffer.writeRelayString(before?.epoch ?? "")
            buffer.writeInteger(Int64(before?.seq ?? -1))
            buffer.writeInteger(UInt32(limit))
        case .info(let request, let room):
            buffer.writeInteger(FrameType.info.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
        case .subscribeAll:
            buffer.writeInteger(FrameType.subscribeAll.rawValue)
        case .listRooms(let request):
            buffer.writeInteger(FrameType.listRooms.rawValue)
            buffer.writeInteger(request)
        case .roomList(let request, let rooms):
            buffer.writeInteger(FrameType.roomList.rawValue)
            buffer.writeInteger(request)
            buffer.writeInteger(UInt32(rooms.count))
            for room in rooms { buffer.writeRelayString(room) }
        case .joined(let request, let room, let replay, let gap):
            buffer.writeInteger(FrameType.joined.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room.name)
            buffer.writeRelayString(room.epoch)
            buffer.writeInteger(Int64(room.seq))
            buffer.writeInteger(UInt32(room.members))
            buffer.writeInteger(Int64(gap?.from ?? -1))
            buffer.writeInteger(Int64(gap?.to ?? -1))
            buffer.writeRelayString(gap?.epoch ?? "")
            buffer.writeMessages(replay, room: room.name)
        case .message(let message):
            buffer.writeInteger(FrameType.message.rawValue)
            buffer.writeRelayString(message.room)
            buffer.writeMessage(message)
        case .published(let request, let room, let seq, let epoch):
            buffer.writeInteger(FrameType.published.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
            buffer.writeInteger(Int64(seq))
            buffer.writeRelayString(epoch)
        case .fetched(let request, let room, let messages, let more):
            buffer.writeInteger(FrameType.fetched.rawValue)
            buffer.writeInteger(request)
            buffer.writeRelayString(room)
            buffer.writeInteger(UInt8(more ? 1 : 0))
            buffer.writeMessages(messages, room: room)
        }
    }

    /// Decodes one whole frame (length prefix already stripped). Anything malformed,
    /// truncated, of another version or with bytes left over throws.
    public static func decode(_ frame: inout ByteBuffer) throws(RelayFrameError) -> RelayFrame {
        var reader = Reader(buffer: frame)
        let version = try reader.u8()
        guard version == Self.version else { throw RelayFrameError("unsupported relay protocol version \(version)") }
        let rawType = try reader.u8()
        guard let type = FrameType(rawValue: rawType) else { throw RelayFrameError("unknown relay frame type \(rawType)") }
        let result: RelayFrame
        switch type {
        case .hello:
            result = .hello(worker: try reader.string())
        case .join:
            let request = try reader.u32()
            let room = try reader.string()
            let since = try reader.optionalInt()
            let epoch = try reader.string()
            result = .join(request: request, room: room, since: since, epoch: epoch.isEmpty ? nil : epoch,
                           history: Int(try reader.u32()), members: Int(try reader.u32()))
        case .leave:
            result = .leave(room: try reader.string(), members: Int(try reader.u32()))
        case .publish:
            result = .publish(request: try reader.u32(), room: try reader.string(), from: try reader.string(), text: try reader.string())
        case .fetch:
            let request = try reader.u32()
            let room = try reader.string()
            let epoch = try reader.string()
            let seq = try reader.optionalInt()
            let before = seq.map { HistoryPosition(epoch: epoch, seq: $0) }
            result = .fetch(request: request, room: room, before: before, limit: Int(try reader.u32()))
        case .info:
            result = .info(request: try reader.u32(), room: try reader.string())
        case .subscribeAll:
            result = .subscribeAll
        case .listRooms:
            result = .listRooms(request: try reader.u32())
        case .roomList:
            let request = try reader.u32()
            let count = Int(try reader.u32())
            // Each name takes at least 4 bytes; a larger count is a lie.
            guard count <= reader.buffer.readableBytes / 4 else { throw RelayFrameError("room count exceeds relay frame") }
            var rooms: [String] = []
            for _ in 0..<count { rooms.append(try reader.string()) }
            result = .roomList(request: request, rooms: rooms)
        case .joined:
            let request = try reader.u32()
            let name = try reader.string()
            let epoch = try reader.string()
            let seq = try reader.int()
            let members = Int(try reader.u32())
            let gapFrom = try reader.optionalInt()
            let gapTo = try reader.optionalInt()
            let gapEpoch = try reader.string()
            let gap = gapFrom.flatMap { from in gapTo.map { Gap(from: from, to: $0, epoch: gapEpoch) } }
            let replay = try reader.messages(room: name)
            result = .joined(request: request, room: RoomSnapshot(name: name, epoch: epoch, seq: seq, members: members), replay: replay, gap: gap)
        case .message:
            let room = try reader.string()
            result = .message(try reader.message(room: room))
        case .published:
            result = .published(request: try reader.u32(), room: try reader.string(), seq: try reader.int(), epoch: try reader.string())
        case .fetched:
            let request = try reader.u32()
            let room = try reader.string()
            let more = try reader.u8() != 0
            result = .fetched(request: request, room: room, messages: try reader.messages(room: room), more: more)
        }
        guard reader.buffer.readableBytes == 0 else { throw RelayFrameError("\(reader.buffer.readableBytes) trailing bytes in relay frame") }
        return result
    }
}

/// Bounds-checked reads: a short or lying frame is an error, never a crash.
private struct Reader {
    var buffer: ByteBuffer

    mutating func u8() throws(RelayFrameError) -> UInt8 {
        guard let value = buffer.readInteger(as: UInt8.self) else { throw RelayFrameError("truncated relay frame") }
        return value
    }

    mutating func u32() throws(RelayFrameError) -> UInt32 {
        guard let value = buffer.readInteger(as: UInt32.self) else { throw RelayFrameError("truncated relay frame") }
        return value
    }

    mutating func int() throws(RelayFrameError) -> Int {
        guard let value = buffer.readInteger(as: Int64.self) else { throw RelayFrameError("truncated relay frame") }
        return Int(value)
    }

    mutating func optionalInt() throws(RelayFrameError) -> Int? {
        let value = try int()
        return value < 0 ? nil : value
    }

    mutating func string() throws(RelayFrameError) -> String {
        let length = Int(try u32())
        guard length <= buffer.readableBytes, let bytes = buffer.readSlice(length: length) else {
            throw RelayFrameError("relay string longer than its frame")
        }
        // String(validating:) is generic all the way (its metadata looked up at run time: a
        // tenth of the relay in a storm of joins); decoding contiguous bytes is not. Decoding
        // repairs, so a text that is not its bytes had invalid UTF-8.
        let valid: String? = bytes.withUnsafeReadableBytes { raw in
            let utf8 = raw.assumingMemoryBound(to: UInt8.self)
            var text = String(decoding: utf8, as: UTF8.self)
            // Compared where both lie (a generic elementsEqual walks the view index by index).
            let same = text.withUTF8 { decoded in
                decoded.count == utf8.count && (utf8.isEmpty || memcmp(decoded.baseAddress!, utf8.baseAddress!, utf8.count) == 0)
            }
            return same ? text : nil
        }
        guard let text = valid else { throw RelayFrameError("invalid UTF-8 in relay frame") }
        return text
    }

    mutating func message(room: String) throws(RelayFrameError) -> RoomMessage {
        RoomMessage(room: room, seq: try int(), epoch: try string(), from: try string(), text: try string(), ts: try int())
    }

    mutating func messages(room: String) throws(RelayFrameError) -> [RoomMessage] {
        let count = Int(try u32())
        // Each message takes at least 28 bytes; a count beyond that is a lie, not a reason to allocate.
        guard count <= buffer.readableBytes / 28 else { throw RelayFrameError("message count exceeds relay frame") }
        var messages: [RoomMessage] = []
        messages.reserveCapacity(count)
        for _ in 0..<count { messages.append(try message(room: room)) }
        return messages
    }
}

extension ByteBuffer {
    fileprivate mutating func writeRelayString(_ string: String) {
        var string = string
        string.withUTF8 { utf8 in
            writeInteger(UInt32(utf8.count))
            guard let source = utf8.baseAddress, !utf8.isEmpty else { return }
            // Copied here rather than by writeString: its copy is NIO's own compiled function,
            // which checks exclusive access to the buffer's storage on every call (perf, a
            // storm of joins: 8 % of the relay, which writes three strings a `joined`).
            writeWithUnsafeMutableBytes(minimumWritableBytes: utf8.count) { target in
                target.baseAddress!.copyMemory(from: source, byteCount: utf8.count)
                return utf8.count
            }
        }
    }

    fileprivate mutating func writeMessage(_ message: RoomMessage) {
        writeInteger(Int64(message.seq))
        writeRelayString(message.epoch)
        writeRelayString(message.from)
        writeRelayString(message.text)
        writeInteger(Int64(message.ts))
    }

    fileprivate mutating func writeMessages(_ messages: [RoomMessage], room: String) {
        writeInteger(UInt32(messages.count))
        for message in messages { writeMessage(message) }
    }
}
