import Foundation
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
        let object: [String: JSONValue]
        do {
            let value = try JSONDecoder().decode(JSONValue.self, from: Data(text.readableBytesView))
            guard case .object(let fields) = value else {
                return .failure(ProtocolError(.badJSON, "a request must be a JSON object"))
            }
            object = fields
        } catch {
            return .failure(ProtocolError(.badJSON, "not valid JSON"))
        }
        var fields = Fields(object: object)
        do {
            let message = try parse(&fields, maxTextBytes: maxTextBytes)
            return .success(message)
        } catch {
            var error = error
            error.ref = error.ref ?? fields.lenientRef
            return .failure(error)
        }
    }

    private static func parse(_ fields: inout Fields, maxTextBytes: Int) throws(ProtocolError) -> ClientMessage {
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
            let text = try fields.string("text")
            guard text.utf8.count <= maxTextBytes else {
                throw ProtocolError(.tooLarge, "text is over \(maxTextBytes) bytes", ref: ref, room: room)
            }
            return .send(room: room, text: text, ref: ref)
        case "ping":
            return .ping(ref: ref)
        case "history":
            let room = try fields.room()
            let before = try fields.optionalPosition("before")
            let limit = try fields.optionalInt("limit", in: 1...200) ?? 50
            return .history(room: room, before: before, limit: limit, ref: ref)
        default:
            throw ProtocolError(.unknownType, "unknown type \"\(type.prefix(64))\"", ref: ref)
        }
    }
}

/// Typed access to a request's fields with protocol errors naming the field.
private struct Fields {
    let object: [String: JSONValue]
    var ref: String?

    init(object: [String: JSONValue]) {
        self.object = object
    }

    /// The `ref` to echo in an error even when the rest of the request is bad.
    var lenientRef: String? {
        if case .string(let value) = object["ref"], value.count <= 64 { return value }
        return nil
    }

    func string(_ key: String) throws(ProtocolError) -> String {
        guard let value = object[key] else { throw ProtocolError(.badJSON, "missing field \"\(key)\"", ref: ref) }
        guard case .string(let text) = value else { throw ProtocolError(.badJSON, "field \"\(key)\" must be a string", ref: ref) }
        return text
    }

    func optionalString(_ key: String) throws(ProtocolError) -> String? {
        guard let value = object[key], value != .null else { return nil }
        guard case .string(let text) = value else { throw ProtocolError(.badJSON, "field \"\(key)\" must be a string", ref: ref) }
        return text
    }

    mutating func optionalRef() throws(ProtocolError) -> String? {
        guard let value = try optionalString("ref") else { return nil }
        guard value.count <= 64 else { throw ProtocolError(.badJSON, "field \"ref\" is longer than 64 characters") }
        ref = value
        return value
    }

    func room() throws(ProtocolError) -> String {
        let room = try string("room")
        guard Names.isValidRoom(room) else {
            throw ProtocolError(.badRoom, "room names are 1 to 64 characters from [A-Za-z0-9_.:-]", ref: ref)
        }
        return room
    }

    func optionalInt(_ key: String, in range: ClosedRange<Int>) throws(ProtocolError) -> Int? {
        guard let value = object[key], value != .null else { return nil }
        guard case .number(let number) = value, let integer = Int(exactly: number), range.contains(integer) else {
            let bounds = range.upperBound == Int.max ? "a non-negative integer" : "an integer from \(range.lowerBound) to \(range.upperBound)"
            throw ProtocolError(.badJSON, "field \"\(key)\" must be \(bounds)", ref: ref)
        }
        return integer
    }

    func optionalPosition(_ key: String) throws(ProtocolError) -> HistoryPosition? {
        guard let value = object[key], value != .null else { return nil }
        guard case .object(let fields) = value, case .string(let epoch)? = fields["epoch"],
              case .number(let number)? = fields["seq"], let seq = Int(exactly: number), seq >= 0 else {
            throw ProtocolError(.badJSON, "field \"\(key)\" must be {\"epoch\": string, \"seq\": integer}", ref: ref)
        }
        return HistoryPosition(epoch: epoch, seq: seq)
    }
}

/// Any JSON value, for validating requests field by field.
enum JSONValue: Decodable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }
}
