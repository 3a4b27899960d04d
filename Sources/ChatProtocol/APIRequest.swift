import NIOCore

/// The body of `POST /api/rooms/{room}/messages` (docs/PROTOCOL.md "Server-side HTTP API"),
/// read with the same JSON reading and field rules as a WebSocket `send`.
public struct PostedMessage: Sendable, Equatable {
    public var text: String
    /// The sender: the body's `from`, `system` without one.
    public var from: String

    /// The largest body worth reading: `text` of the maximum size, every byte escaped
    /// (`\u00XX`, 6 bytes), plus a little JSON around it. A bigger one is `too_large`.
    public static func maximumBodyBytes(maxTextBytes: Int) -> Int {
        maxTextBytes * 6 + 1024
    }

    /// `bad_json` when the body is not a JSON object or `text` is not a string, `too_large`
    /// for `text` over `maxTextBytes`, `bad_user` for a `from` that is not a user name.
    public static func decode(_ body: ByteBuffer, maxTextBytes: Int) -> Result<PostedMessage, ProtocolError> {
        RequestFields.parse(body, what: #"the body ({"text": ..., "from": ...})"#).flatMap { fields in
            do throws(ProtocolError) {
                let text = try fields.text(maxTextBytes: maxTextBytes)
                let from = try fields.optionalUser("from", fallback: "system")
                return .success(PostedMessage(text: text, from: from))
            } catch {
                return .failure(error)
            }
        }
    }
}

/// The query of `GET /api/rooms/{room}/messages?before_epoch=E&before_seq=S&limit=N`:
/// the same page as a WebSocket `history` request.
public struct HistoryQuery: Sendable, Equatable {
    public var before: HistoryPosition?
    public var limit: Int

    /// `before_epoch` and `before_seq` (an integer >= 0) go together; one alone, or a seq
    /// that is not such an integer, is ignored. `limit` out of range (or not an integer)
    /// is `bad_json`, as in `history`.
    public static func decode(_ query: [Substring: Substring]) -> Result<HistoryQuery, ProtocolError> {
        var before: HistoryPosition?
        if let epoch = query["before_epoch"], let seq = query["before_seq"].flatMap({ Int($0) }), seq >= 0 {
            before = HistoryPosition(epoch: String(epoch), seq: seq)
        }
        let limit = query["limit"].map { Int($0) } ?? HistoryLimit.standard
        guard let limit, HistoryLimit.range.contains(limit) else {
            return .failure(RequestFields.rangeError("limit", HistoryLimit.range))
        }
        return .success(HistoryQuery(before: before, limit: limit))
    }
}
