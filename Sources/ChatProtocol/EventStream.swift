import NIOCore

// The Server-Sent Events transport of docs/PROTOCOL.md ("SSE"): the same server messages
// as WebSocket, each one event, and an event id that lets a browser's automatic
// reconnect resume every room of the stream at once.

/// Server messages as SSE bytes: `event: <type>`, `data: <the JSON a WebSocket client
/// gets>`, an empty line. The JSON never holds a raw line break (JSONWriter escapes
/// control characters), so one `data:` line carries it.
public enum EventStreamBytes {
    /// A comment line: keeps proxies from timing the stream out; EventSource ignores it.
    public static let heartbeat = ByteBuffer(string: ": hb\n\n")

    public static func write(_ message: ServerMessage, into buffer: inout ByteBuffer) {
        buffer.writeStaticString("event: ")
        buffer.writeString(message.type)
        buffer.writeStaticString("\ndata: ")
        message.encode(into: &buffer)
        buffer.writeStaticString("\n\n")
    }

    public static func event(_ message: ServerMessage, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 160)
        write(message, into: &buffer)
        return buffer
    }

    /// How long EventSource waits before it reconnects, for the `bye` that follows.
    public static func writeRetry(milliseconds: Int, into buffer: inout ByteBuffer) {
        buffer.writeStaticString("retry: ")
        buffer.writeString(String(milliseconds))
        buffer.writeStaticString("\n")
    }
}

/// A room's position: its epoch and a seq in it. A client's resume point, as `join` takes
/// it (the last seq it has), and the archive's tip (`ArchivedTip`, its newest message).
public struct StreamMark: Sendable, Equatable {
    public var room: String
    public var epoch: String
    public var seq: Int

    public init(room: String, epoch: String, seq: Int) {
        self.room = room
        self.epoch = epoch
        self.seq = seq
    }
}

/// Where an event stream stands in every room it holds, written as the SSE event id
/// `room/epoch/seq,room/epoch/seq,...`. A browser sends back only the last id it saw
/// (`Last-Event-ID`), so each id carries all rooms. Room names and epochs hold neither
/// `/` nor `,` (epochs are 16 hex digits on both buses).
public struct StreamPosition: Sendable, Equatable {
    public private(set) var marks: [StreamMark] = []

    public init(_ marks: [StreamMark] = []) {
        self.marks = marks
    }

    /// The position a stream starts from: the resume points of its opening joins. Until a
    /// room's replay has come, its id keeps asking for the same replay.
    public init(resuming requests: [Result<ClientMessage, ProtocolError>]) {
        for case .success(.join(let room, let since?, let epoch?, _, _)) in requests {
            set(StreamMark(room: room, epoch: epoch, seq: since))
        }
    }

    public subscript(room: String) -> StreamMark? {
        marks.first { $0.room == room }
    }

    /// The position in `mark.room` moves to `mark`.
    public mutating func set(_ mark: StreamMark) {
        if let index = marks.firstIndex(where: { $0.room == mark.room }) {
            marks[index] = mark
        } else {
            marks.append(mark)
        }
    }

    /// What a message sent on the stream does to the position (docs/PROTOCOL.md: the
    /// resume point is the last `message`'s epoch and seq, or a later `gap`'s epoch and
    /// `to`). A `joined` only places a room the stream had no position in: for a resume,
    /// the replay that follows it is still to come. True when the message carries an id.
    public mutating func advance(by message: ServerMessage) -> Bool {
        switch message {
        case .message(let message):
            set(StreamMark(room: message.room, epoch: message.epoch, seq: message.seq))
        case .gap(let room, _, let to, let epoch):
            set(StreamMark(room: room, epoch: epoch, seq: to))
        case .joined(let room, let seq, let epoch, _, _):
            if self[room] == nil { set(StreamMark(room: room, epoch: epoch, seq: seq)) }
        default:
            return false
        }
        return true
    }

    /// The `id:` line of the next event.
    public func writeIDLine(into buffer: inout ByteBuffer) {
        buffer.writeStaticString("id: ")
        for (index, mark) in marks.enumerated() {
            if index > 0 { buffer.writeStaticString(",") }
            buffer.writeString(mark.room)
            buffer.writeStaticString("/")
            buffer.writeString(mark.epoch)
            buffer.writeStaticString("/")
            buffer.writeString(String(mark.seq))
        }
        buffer.writeStaticString("\n")
    }

    /// The id alone, as a client sends it back.
    public var id: String {
        var buffer = ByteBuffer()
        writeIDLine(into: &buffer)
        return String(decoding: buffer.readableBytesView.dropFirst(4).dropLast(), as: UTF8.self)
    }

    /// Reads an event id. Every entry must be `room/epoch/seq` with a valid room name, an
    /// epoch of 1 to 64 characters and a seq >= 0, each room once; anything else is
    /// `bad_json` naming the id. An empty id is no position.
    /// `field`: what the client called it, for the error (a WebSocket URL's is `resume`).
    public static func parse(_ id: Substring, field: String = "Last-Event-ID") -> Result<StreamPosition, ProtocolError> {
        var position = StreamPosition()
        guard !id.isEmpty else { return .success(position) }
        let refusal = ProtocolError(.badJSON, "\(field) \"\(id.prefix(200))\" is not room/epoch/seq,... as this server writes it")
        for entry in id.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = entry.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 3, Names.isValidRoom(String(parts[0])), (1...64).contains(parts[1].utf8.count),
                  parts[1].utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }),
                  let seq = Int(parts[2]), seq >= 0, position[String(parts[0])] == nil else {
                return .failure(refusal)
            }
            position.set(StreamMark(room: String(parts[0]), epoch: String(parts[1]), seq: seq))
        }
        return .success(position)
    }
}

/// What `GET /sse` asks for: the rooms of `?rooms=` (comma-separated) and those of the
/// stream's last event id, each as the `join` a WebSocket client would send (with `since`
/// and `epoch` where the id has a position), in that order; and what is wrong with the
/// request, as the `error`s to send before the joins. A bad room is skipped; a bad id is
/// ignored (its rooms are joined as if there were no id).
public struct EventStreamRequest: Sendable, Equatable {
    public var requests: [Result<ClientMessage, ProtocolError>]

    /// `history`: the `?history=` value, the history of rooms joined without a position.
    /// `resumeField`: what the client called the position, for its error.
    public static func decode(rooms: Substring?, lastEventID: Substring?, history: Substring?,
                              resumeField: String = "Last-Event-ID") -> EventStreamRequest {
        // The usual URL join: one valid room, no position, no history. No lists to build.
        if lastEventID == nil, history == nil, let rooms, let room = singleRoom(rooms) {
            return EventStreamRequest(requests: [.success(.join(room: room, since: nil, epoch: nil, history: 0, ref: nil))])
        }
        var requests: [Result<ClientMessage, ProtocolError>] = []
        var position = StreamPosition()
        if let lastEventID {
            switch StreamPosition.parse(lastEventID, field: resumeField) {
            case .success(let parsed): position = parsed
            case .failure(let refusal): requests.append(.failure(refusal))
            }
        }
        var historyCount = 0
        if let history {
            if let count = Int(history), (0...100).contains(count) {
                historyCount = count
            } else {
                requests.append(.failure(RequestFields.rangeError("history", 0...100)))
            }
        }
        var names: [String] = []
        for room in roomNames(rooms ?? "") {
            guard Names.isValidRoom(room) else {
                requests.append(.failure(ProtocolError(.badRoom, "room names are \(Names.roomRule)", room: String(room.prefix(64)))))
                continue
            }
            if !names.contains(room) { names.append(room) }
        }
        for mark in position.marks where !names.contains(mark.room) { names.append(mark.room) }
        for room in names {
            let mark = position[room]
            requests.append(.success(.join(room: room, since: mark?.seq, epoch: mark?.epoch, history: mark == nil ? historyCount : 0, ref: nil)))
        }
        return EventStreamRequest(requests: requests)
    }

    /// `list` as one valid room name (no comma, nothing to skip), or nil.
    private static func singleRoom(_ list: Substring) -> String? {
        let room = String(list)
        return Names.isValidRoom(room) ? room : nil  // the rule has no `,` and no empty name
    }

    /// The comma-separated names, empty ones skipped. ASCII is split by bytes (breaking it
    /// into Characters was most of a URL join's reading); anything else by Characters, where
    /// a `,` followed by a combining mark is one Character and no separator.
    private static func roomNames(_ list: Substring) -> [String] {
        guard list.utf8.allSatisfy({ $0 < 0x80 }) else { return list.split(separator: ",").map(String.init) }
        return list.utf8.split(separator: UInt8(ascii: ",")).map { String(Substring($0)) }
    }
}

/// The body of `POST /sse/send`, `{"room":..,"text":..,"ref":..}`: the fields and rules
/// of a WebSocket `send`.
public struct StreamedSend: Sendable, Equatable {
    public var room: String
    public var text: String
    public var ref: String?

    public static func decode(_ body: ByteBuffer, maxTextBytes: Int) -> Result<StreamedSend, ProtocolError> {
        RequestFields.parse(body, what: #"the body ({"room": ..., "text": ..., "ref": ...})"#).flatMap { fields in
            do throws(ProtocolError) {
                let room = try fields.room()
                let text = try fields.text(maxTextBytes: maxTextBytes, room: room)
                return .success(StreamedSend(room: room, text: text, ref: try fields.optionalRef()))
            } catch {
                var error = error
                error.ref = fields.lenientRef
                return .failure(error)
            }
        }
    }
}
