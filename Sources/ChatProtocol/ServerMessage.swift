import NIOCore

/// One sequenced chat message, as the bus delivers it and clients receive it.
public struct RoomMessage: Sendable, Equatable {
    public var room: String
    public var seq: Int
    public var epoch: String
    public var from: String
    public var text: String
    /// Milliseconds since the Unix epoch, server clock.
    public var ts: Int

    public init(room: String, seq: Int, epoch: String, from: String, text: String, ts: Int) {
        self.room = room
        self.seq = seq
        self.epoch = epoch
        self.from = from
        self.text = text
        self.ts = ts
    }
}

/// Error codes of docs/PROTOCOL.md: those of the `error` frame, and those only an HTTP
/// refusal carries ("HTTP answers").
public enum ErrorCode: String, Sendable, CaseIterable {
    case badJSON = "bad_json"
    case badFrame = "bad_frame"
    case unknownType = "unknown_type"
    case badRoom = "bad_room"
    case notJoined = "not_joined"
    case tooLarge = "too_large"
    case rateLimited = "rate_limited"
    case forbidden
    case tooManyRooms = "too_many_rooms"
    case unavailable
    case `internal`
    // HTTP refusals only.
    case badUser = "bad_user"
    case unauthorized
    case notFound = "not_found"
    case badRequest = "bad_request"

    /// The status of an HTTP refusal with this code: docs/PROTOCOL.md "HTTP answers" for the
    /// codes sent over HTTP; the codes that are not get the status nearest their meaning.
    public var httpStatus: Int {
        switch self {
        case .badJSON, .badFrame, .unknownType, .badRoom, .notJoined, .tooLarge, .tooManyRooms, .badUser: 400
        case .unauthorized: 401
        case .forbidden: 403
        case .notFound: 404
        case .badRequest: 426
        case .rateLimited: 429
        case .internal: 500
        case .unavailable: 503
        }
    }
}

/// `bye` reasons of docs/PROTOCOL.md.
public enum ByeReason: String, Sendable {
    case reload
    case shutdown
    case slowConsumer = "slow_consumer"
    case flood
    case kicked
}

/// WebSocket close codes of docs/PROTOCOL.md.
public enum CloseCode {
    public static let normal: UInt16 = 1000
    public static let goingAway: UInt16 = 1001
    public static let protocolError: UInt16 = 1002
    public static let invalidUTF8: UInt16 = 1007
    public static let policy: UInt16 = 1008
    public static let tooBig: UInt16 = 1009
    public static let slowConsumer: UInt16 = 4000
    public static let flood: UInt16 = 4001
    public static let kicked: UInt16 = 4002

    /// The close code that goes with a `bye` reason.
    public static func forBye(_ reason: ByeReason) -> UInt16 {
        switch reason {
        case .reload, .shutdown: goingAway
        case .slowConsumer: slowConsumer
        case .flood: flood
        case .kicked: kicked
        }
    }
}

/// A refused request: the `error` frame's fields.
public struct ProtocolError: Error, Sendable, Equatable {
    public var code: ErrorCode
    public var message: String
    public var ref: String?
    public var room: String?

    public init(_ code: ErrorCode, _ message: String, ref: String? = nil, room: String? = nil) {
        self.code = code
        self.message = message
        self.ref = ref
        self.room = room
    }

    /// The body of an HTTP refusal, `{"code":...,"message":...}` (docs/PROTOCOL.md "HTTP answers").
    public func httpBody(_ allocator: ByteBufferAllocator) -> ByteBuffer {
        var json = JSONWriter(buffer: allocator.buffer(capacity: 64 + message.utf8.count))
        json.beginObject()
        json.field("code", code.rawValue)
        json.field("message", message)
        json.endObject()
        return json.buffer
    }
}

/// Every frame the server sends, per docs/PROTOCOL.md "Server to client".
public enum ServerMessage: Sendable {
    case hello(user: String, conn: String, heartbeatSeconds: Int)
    case joined(room: String, seq: Int, epoch: String, members: Int, ref: String?)
    case message(RoomMessage)
    case ack(ref: String, room: String, seq: Int)
    case left(room: String, ref: String?)
    case gap(room: String, from: Int, to: Int, epoch: String)
    case pong(ref: String?)
    case history(room: String, messages: [RoomMessage], more: Bool, ref: String?)
    case error(ProtocolError)
    case bye(reason: ByeReason, retryMs: Int)

    /// The `type` field: what the message is (also its SSE event name).
    public var type: String {
        switch self {
        case .hello: "hello"
        case .joined: "joined"
        case .message: "message"
        case .ack: "ack"
        case .left: "left"
        case .gap: "gap"
        case .pong: "pong"
        case .history: "history"
        case .error: "error"
        case .bye: "bye"
        }
    }

    /// The JSON text of this frame, appended to `buffer`.
    public func encode(into buffer: inout ByteBuffer) {
        if case .hello(let user, let conn, let heartbeat) = self {
            let hello = HelloText(user: user, conn: conn, heartbeatSeconds: heartbeat)
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: hello.length) { hello.write(into: $0) ?? 0 }
            return
        }
        var json = JSONWriter(buffer: buffer)
        buffer = ByteBuffer()  // leaves the writer the only owner, so appending does not copy
        json.beginObject()
        json.field("type", type)
        switch self {
        case .hello:
            break  // HelloText, above
        case .joined(let room, let seq, let epoch, let members, let ref):
            json.field("room", room)
            json.field("seq", seq)
            json.field("epoch", epoch)
            json.field("members", members)
            json.field("ref", ifPresent: ref)
        case .message(let message):
            Self.writeMessageFields(message, withRoom: true, into: &json)
        case .ack(let ref, let room, let seq):
            json.field("ref", ref)
            json.field("room", room)
            json.field("seq", seq)
        case .left(let room, let ref):
            json.field("room", room)
            json.field("ref", ifPresent: ref)
        case .gap(let room, let from, let to, let epoch):
            json.field("room", room)
            json.field("from", from)
            json.field("to", to)
            json.field("epoch", epoch)
        case .pong(let ref):
            json.field("ref", ifPresent: ref)
        case .history(let room, let messages, let more, let ref):
            json.field("room", room)
            json.beginArray("messages")
            for message in messages {
                json.beginObject()
                Self.writeMessageFields(message, withRoom: false, into: &json)
                json.endObject()
            }
            json.endArray()
            json.field("more", more)
            json.field("ref", ifPresent: ref)
        case .error(let error):
            json.field("code", error.code.rawValue)
            json.field("message", error.message)
            json.field("ref", ifPresent: error.ref)
            json.field("room", ifPresent: error.room)
        case .bye(let reason, let retryMs):
            json.field("reason", reason.rawValue)
            json.field("retry_ms", retryMs)
        }
        json.endObject()
        buffer = json.buffer
    }

    /// Encodes into a fresh buffer from `allocator`.
    public func encoded(_ allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128)
        encode(into: &buffer)
        return buffer
    }

    private static func writeMessageFields(_ message: RoomMessage, withRoom: Bool, into json: inout JSONWriter) {
        if withRoom { json.field("room", message.room) }
        json.field("seq", message.seq)
        json.field("epoch", message.epoch)
        json.field("from", message.from)
        json.field("text", message.text)
        json.field("ts", message.ts)
    }
}

/// `hello`'s JSON text, written straight into memory: every connection gets one, and
/// ByteBuffer's checks on each of a JSONWriter's writes were a tenth of the handshake's
/// user space on the epoll engine. The only encoder of `hello`.
public struct HelloText {
    private var user: String
    private var conn: String
    /// Never negative (`server.heartbeat_s` is 1-3600).
    private let heartbeatSeconds: Int
    private var userLength = 0, connLength = 0
    /// Its length in bytes.
    public private(set) var length = 0

    private static let start: StaticString = #"{"type":"hello","user":"#
    private static let connKey: StaticString = #","conn":"#
    private static let rest: StaticString = #","protocol":1,"heartbeat_s":"#

    public init(user: String, conn: String, heartbeatSeconds: Int) {
        self.user = user
        self.conn = conn
        self.heartbeatSeconds = max(0, heartbeatSeconds)
        userLength = self.user.withUTF8 { JSONWriter.quotedLength($0) }
        connLength = self.conn.withUTF8 { JSONWriter.quotedLength($0) }
        length = Self.start.utf8CodeUnitCount + Self.connKey.utf8CodeUnitCount + Self.rest.utf8CodeUnitCount
            + userLength + connLength + ASCIIDigits.count(UInt64(self.heartbeatSeconds)) + 1
    }

    /// Writes it at the start of `out`; answers its length, or nil if `out` is too short.
    public func write(into out: UnsafeMutableRawBufferPointer) -> Int? {
        guard out.count >= length else { return nil }
        var user = user, conn = conn
        var at = Self.copy(Self.start, into: out, at: 0)
        at = user.withUTF8 { JSONWriter.writeQuoted($0, length: userLength, into: out, at: at) }
        at = Self.copy(Self.connKey, into: out, at: at)
        at = conn.withUTF8 { JSONWriter.writeQuoted($0, length: connLength, into: out, at: at) }
        at = Self.copy(Self.rest, into: out, at: at)
        at = ASCIIDigits.write(UInt64(heartbeatSeconds), into: out, at: at)
        out[at] = UInt8(ascii: "}")
        return at + 1
    }

    private static func copy(_ text: StaticString, into out: UnsafeMutableRawBufferPointer, at: Int) -> Int {
        text.withUTF8Buffer { UnsafeMutableRawBufferPointer(rebasing: out[at...]).copyMemory(from: UnsafeRawBufferPointer($0)) }
        return at + text.utf8CodeUnitCount
    }
}
