import NIOCore

/// A request's JSON object with typed access to its fields: the one reading of request
/// bodies for both entrances, WebSocket frames (`ClientMessage`) and HTTP API bodies
/// (`PostedMessage`). Every way a field can be wrong becomes a `ProtocolError` with the
/// code docs/PROTOCOL.md names and a message naming the field. The `ref` of a refused
/// WebSocket request is added by `ClientMessage.decode` (see `lenientRef`).
struct RequestFields {
    let object: [String: JSONValue]

    /// Reads one JSON object (`what` names it in the error: "a request", "the body").
    /// Anything else, or no valid JSON at all, is `bad_json`.
    static func parse(_ bytes: ByteBuffer, what: String) -> Result<RequestFields, ProtocolError> {
        guard let value = JSONReader.read(bytes) else {
            return .failure(ProtocolError(.badJSON, "not valid JSON"))
        }
        guard case .object(let fields) = value else {
            return .failure(ProtocolError(.badJSON, "\(what) must be a JSON object"))
        }
        return .success(RequestFields(object: fields))
    }

    /// The `ref` to echo in an error even when the rest of the request is bad: the same
    /// value `optionalRef` accepts, nil for one it refuses.
    var lenientRef: String? {
        if case .string(let value) = object["ref"], value.count <= 64 { return value }
        return nil
    }

    func string(_ key: String) throws(ProtocolError) -> String {
        guard let value = object[key] else { throw ProtocolError(.badJSON, "missing field \"\(key)\"") }
        guard case .string(let text) = value else { throw ProtocolError(.badJSON, "field \"\(key)\" must be a string") }
        return text
    }

    func optionalString(_ key: String) throws(ProtocolError) -> String? {
        guard let value = object[key], value != .null else { return nil }
        guard case .string(let text) = value else { throw ProtocolError(.badJSON, "field \"\(key)\" must be a string") }
        return text
    }

    func optionalRef() throws(ProtocolError) -> String? {
        guard let value = try optionalString("ref") else { return nil }
        guard value.count <= 64 else { throw ProtocolError(.badJSON, "field \"ref\" is longer than 64 characters") }
        return value
    }

    func room() throws(ProtocolError) -> String {
        try Names.checkedRoom(string("room"))
    }

    /// A message's `text`: a string of at most `maxTextBytes` UTF-8 bytes.
    func text(maxTextBytes: Int, room: String? = nil) throws(ProtocolError) -> String {
        let text = try string("text")
        guard text.utf8.count <= maxTextBytes else {
            throw ProtocolError(.tooLarge, "text is over \(maxTextBytes) bytes", room: room)
        }
        return text
    }

    /// A user name field, `fallback` when absent or null. Anything but a valid name,
    /// a number or a list too, is `bad_user`.
    func optionalUser(_ key: String, fallback: String) throws(ProtocolError) -> String {
        guard let value = object[key], value != .null else { return fallback }
        guard case .string(let name) = value else { throw Names.userError(field: key) }
        return try Names.checkedUser(name[...], field: key)
    }

    func optionalInt(_ key: String, in range: ClosedRange<Int>) throws(ProtocolError) -> Int? {
        guard let value = object[key], value != .null else { return nil }
        guard case .number(let number) = value, let integer = Int(exactly: number), range.contains(integer) else {
            throw Self.rangeError(key, range)
        }
        return integer
    }

    /// The refusal of a field that is not an integer in `range`.
    static func rangeError(_ key: String, _ range: ClosedRange<Int>) -> ProtocolError {
        let bounds = range.upperBound == Int.max ? "a non-negative integer" : "an integer from \(range.lowerBound) to \(range.upperBound)"
        return ProtocolError(.badJSON, "field \"\(key)\" must be \(bounds)")
    }

    func optionalPosition(_ key: String) throws(ProtocolError) -> HistoryPosition? {
        guard let value = object[key], value != .null else { return nil }
        guard case .object(let fields) = value, case .string(let epoch)? = fields["epoch"],
              case .number(let number)? = fields["seq"], let seq = Int(exactly: number), seq >= 0 else {
            throw ProtocolError(.badJSON, "field \"\(key)\" must be {\"epoch\": string, \"seq\": integer}")
        }
        return HistoryPosition(epoch: epoch, seq: seq)
    }
}

/// The page size of a `history` request and of the API's message pages.
enum HistoryLimit {
    static let range = 1...200
    static let standard = 50
}

/// Any JSON value, for validating requests field by field (built by `JSONReader`).
enum JSONValue: Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])
}
