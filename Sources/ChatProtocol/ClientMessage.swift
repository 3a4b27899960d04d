import NIOCore

/// A resume point or scroll-back anchor: a message's place in its room's history.
public struct HistoryPosition: Sendable, Equatable {
    public var epoch: String
    public var seq: Int

    public init(epoch: String, seq: Int) {
        self.epoch = epoch
        self.seq = seq
    }
}

/// Every request a client may send, per docs/PROTOCOL.md "Client to server".
public enum ClientMessage: Sendable, Equatable {
    case join(room: String, since: Int?, epoch: String?, history: Int, ref: String?)
    case leave(room: String, ref: String?)
    case send(room: String, text: String, ref: String?)
    case ping(ref: String?)
    case history(room: String, before: HistoryPosition?, limit: Int, ref: String?)

    public var ref: String? {
        switch self {
        case .join(_, _, _, _, let ref), .leave(_, let ref), .send(_, _, let ref), .ping(let ref), .history(_, _, _, let ref): ref
        }
    }

    /// Parses one text frame. Every way a frame can be wrong becomes a `ProtocolError`
    /// with the code docs/PROTOCOL.md names and a message saying which field is wrong.
    public static func decode(_ text: ByteBuffer, maxTextBytes: Int) -> Result<ClientMessage, ProtocolError> {
        RequestFields.parse(text, what: "a request").flatMap { fields in
            do throws(ProtocolError) {
                return .success(try parse(fields, maxTextBytes: maxTextBytes))
            } catch {
                var error = error
                error.ref = fields.lenientRef
                return .failure(error)
            }
        }
    }

    private static func parse(_ fields: RequestFields, maxTextBytes: Int) throws(ProtocolError) -> ClientMessage {
        let type = try fields.string("type")
        let ref = try fields.optionalRef()
        switch type {
        case "join":
            let room = try fields.room()
            let since = try fields.optionalInt("since", in: 0...Int.max)
            let epoch = try fields.optionalString("epoch")
            let history = try fields.optionalInt("history", in: 0...100) ?? 0
            return .join(room: room, since: since, epoch: epoch, history: history, ref: ref)
        case "leave":
            return .leave(room: try fields.room(), ref: ref)
        case "send":
            let room = try fields.room()
            let text = try fields.text(maxTextBytes: maxTextBytes, room: room)
            return .send(room: room, text: text, ref: ref)
        case "ping":
            return .ping(ref: ref)
        case "history":
            let room = try fields.room()
            let before = try fields.optionalPosition("before")
            let limit = try fields.optionalInt("limit", in: HistoryLimit.range) ?? HistoryLimit.standard
            return .history(room: room, before: before, limit: limit, ref: ref)
        default:
            throw ProtocolError(.unknownType, "unknown type \"\(type.prefix(64))\"")
        }
    }
}
