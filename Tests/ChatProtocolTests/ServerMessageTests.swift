import Foundation
import NIOCore
import Testing
@testable import ChatProtocol

@Suite struct ServerMessageEncodingTests {
    static let bob = RoomMessage(room: "live:42", seq: 117, epoch: "e9c1", from: "bob", text: "hi", ts: 1_764_000_000_000)
    static let carol = RoomMessage(room: "live:42", seq: 118, epoch: "e9c1", from: "carol", text: "yo", ts: 1_764_000_000_150)

    @Test func hello() {
        #expect(encoded(.hello(user: "alice", conn: "w1-7f3a", heartbeatSeconds: 30))
            == #"{"type":"hello","user":"alice","conn":"w1-7f3a","protocol":1,"heartbeat_s":30}"#)
    }

    /// `hello` is written straight into memory (`HelloText`), not through JSONWriter: it
    /// must come out as JSONWriter writes every other string and number.
    @Test(arguments: [("alice", 30), ("", 1), ("q\"uo\\te\n\u{1}é😀", 3600), (String(repeating: "x", count: 300), 7)])
    func helloIsWrittenAsJSONWriterWould(user: String, heartbeat: Int) throws {
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("type", "hello")
        json.field("user", user)
        json.field("conn", "w0-\(heartbeat)")
        json.field("protocol", 1)
        json.field("heartbeat_s", heartbeat)
        json.endObject()
        let expected = String(buffer: json.buffer)
        #expect(encoded(.hello(user: user, conn: "w0-\(heartbeat)", heartbeatSeconds: heartbeat)) == expected)
        let text = HelloText(user: user, conn: "w0-\(heartbeat)", heartbeatSeconds: heartbeat)
        #expect(text.length == expected.utf8.count)
        let short = UnsafeMutableRawBufferPointer.allocate(byteCount: text.length - 1, alignment: 1)
        defer { short.deallocate() }
        #expect(text.write(into: short) == nil)
        #expect(try JSONSerialization.jsonObject(with: Data(expected.utf8)) is [String: Any])
    }

    @Test func joined() {
        #expect(encoded(.joined(room: "live:42", seq: 118, epoch: "e9c1", members: 5210, ref: nil))
            == #"{"type":"joined","room":"live:42","seq":118,"epoch":"e9c1","members":5210}"#)
        #expect(encoded(.joined(room: "live:42", seq: 0, epoch: "e", members: 1, ref: "j1"))
            == #"{"type":"joined","room":"live:42","seq":0,"epoch":"e","members":1,"ref":"j1"}"#)
    }

    @Test func message() {
        #expect(encoded(.message(Self.bob))
            == #"{"type":"message","room":"live:42","seq":117,"epoch":"e9c1","from":"bob","text":"hi","ts":1764000000000}"#)
    }

    @Test func ack() {
        #expect(encoded(.ack(ref: "a1", room: "live:42", seq: 119)) == #"{"type":"ack","ref":"a1","room":"live:42","seq":119}"#)
    }

    @Test func left() {
        #expect(encoded(.left(room: "r", ref: nil)) == #"{"type":"left","room":"r"}"#)
        #expect(encoded(.left(room: "r", ref: "l1")) == #"{"type":"left","room":"r","ref":"l1"}"#)
    }

    @Test func gap() {
        #expect(encoded(.gap(room: "r", from: 3, to: 9, epoch: "e2")) == #"{"type":"gap","room":"r","from":3,"to":9,"epoch":"e2"}"#)
        #expect(encoded(.gap(room: "r", from: 0, to: 0, epoch: "e2")) == #"{"type":"gap","room":"r","from":0,"to":0,"epoch":"e2"}"#)
    }

    @Test func pong() {
        #expect(encoded(.pong(ref: nil)) == #"{"type":"pong"}"#)
        #expect(encoded(.pong(ref: "p1")) == #"{"type":"pong","ref":"p1"}"#)
    }

    @Test func history() {
        #expect(encoded(.history(room: "live:42", messages: [Self.bob, Self.carol], more: true, ref: "h1"))
            == #"{"type":"history","room":"live:42","messages":["#
            + #"{"seq":117,"epoch":"e9c1","from":"bob","text":"hi","ts":1764000000000},"#
            + #"{"seq":118,"epoch":"e9c1","from":"carol","text":"yo","ts":1764000000150}"#
            + #"],"more":true,"ref":"h1"}"#)
        #expect(encoded(.history(room: "r", messages: [], more: false, ref: nil)) == #"{"type":"history","room":"r","messages":[],"more":false}"#)
        #expect(encoded(.history(room: "r", messages: [Self.bob], more: false, ref: nil))
            == #"{"type":"history","room":"r","messages":[{"seq":117,"epoch":"e9c1","from":"bob","text":"hi","ts":1764000000000}],"more":false}"#)
    }

    @Test func error() {
        #expect(encoded(.error(ProtocolError(.badJSON, "not valid JSON"))) == #"{"type":"error","code":"bad_json","message":"not valid JSON"}"#)
        #expect(encoded(.error(ProtocolError(.tooLarge, "too big", ref: "s1", room: "r")))
            == #"{"type":"error","code":"too_large","message":"too big","ref":"s1","room":"r"}"#)
        #expect(encoded(.error(ProtocolError(.notJoined, "join first", room: "r")))
            == #"{"type":"error","code":"not_joined","message":"join first","room":"r"}"#)
    }

    @Test(arguments: [
        (ByeReason.reload, "reload"), (.shutdown, "shutdown"), (.slowConsumer, "slow_consumer"), (.flood, "flood"), (.kicked, "kicked"),
    ])
    func bye(_ reason: ByeReason, _ text: String) {
        #expect(encoded(.bye(reason: reason, retryMs: 1500)) == #"{"type":"bye","reason":"\#(text)","retry_ms":1500}"#)
    }

    @Test func errorCodesAreTheProtocolsNames() {
        let codes: [ErrorCode] = [.badJSON, .badFrame, .unknownType, .badRoom, .notJoined, .tooLarge, .rateLimited, .forbidden,
                                  .tooManyRooms, .unavailable, .internal]
        #expect(codes.map(\.rawValue) == ["bad_json", "bad_frame", "unknown_type", "bad_room", "not_joined", "too_large",
                                          "rate_limited", "forbidden", "too_many_rooms", "unavailable", "internal"])
    }

    @Test func negativeAndLargeIntegers() {
        #expect(encoded(.ack(ref: "a", room: "r", seq: Int.max)) == #"{"type":"ack","ref":"a","room":"r","seq":9223372036854775807}"#)
        #expect(encoded(.bye(reason: .flood, retryMs: -1)) == #"{"type":"bye","reason":"flood","retry_ms":-1}"#)
    }

    @Test func encodeAppendsToWhatTheBufferHolds() {
        var buffer = ByteBuffer(string: "prefix|")
        ServerMessage.pong(ref: nil).encode(into: &buffer)
        ServerMessage.pong(ref: "2").encode(into: &buffer)
        #expect(String(buffer: buffer) == #"prefix|{"type":"pong"}{"type":"pong","ref":"2"}"#)
    }

    @Test func encodedUsesAFreshBuffer() {
        let buffer = ServerMessage.pong(ref: "x").encoded(ByteBufferAllocator())
        #expect(String(buffer: buffer) == #"{"type":"pong","ref":"x"}"#)
    }

    // MARK: Escaping

    static let awkwardStrings = [
        #"he said "hi""#, #"back\slash"#, #"\"#, #"""#, "\u{01}", "\u{00}", "\u{1F}", "\u{7F}",
        "line1\nline2\r\nend\ttab", "\u{08}\u{0C}", "emoji 😀👍🏽, é, 中文, עברית", "\u{2028}\u{2029}", "</script>", "",
        String((0..<32).map { Character(Unicode.Scalar(UInt8($0))) }),
    ]

    @Test(arguments: awkwardStrings)
    func stringsRoundTripThroughFoundation(_ text: String) throws {
        let message = RoomMessage(room: "r", seq: 1, epoch: "e", from: text, text: text, ts: 0)
        let object = try parsedObject(encoded(.message(message)))
        #expect(object["text"] as? String == text)
        #expect(object["from"] as? String == text)
        let error = try parsedObject(encoded(.error(ProtocolError(.internal, text, ref: text, room: text))))
        #expect(error["message"] as? String == text)
        #expect(error["ref"] as? String == text)
        #expect(error["room"] as? String == text)
    }

    @Test func historyRoundTripsThroughFoundation() throws {
        let texts = Self.awkwardStrings
        let messages = texts.enumerated().map { RoomMessage(room: "r", seq: $0.offset, epoch: "e\"", from: "u", text: $0.element, ts: $0.offset * 10) }
        let object = try parsedObject(encoded(.history(room: "r", messages: messages, more: true, ref: "\\")))
        let list = try #require(object["messages"] as? [[String: Any]])
        #expect(list.compactMap { $0["text"] as? String } == texts)
        #expect(list.compactMap { $0["seq"] as? Int } == Array(0..<texts.count))
        #expect(list.allSatisfy { $0["epoch"] as? String == "e\"" && $0["room"] == nil })
        #expect(object["more"] as? Bool == true)
        #expect(object["ref"] as? String == "\\")
    }

    @Test func escapesAreTheShortFormsOrLowercaseHex() {
        let message = RoomMessage(room: "r", seq: 1, epoch: "e", from: "u", text: "\"\\\n\r\t\u{01}\u{1F}\u{00}é😀", ts: 0)
        #expect(encoded(.message(message)).contains(#""text":"\"\\\n\r\t\u0001\u001f\u0000é😀""#))
    }

    @Test func nonASCIIIsWrittenAsUTF8() {
        var buffer = ByteBuffer()
        ServerMessage.pong(ref: "é😀").encode(into: &buffer)
        #expect(Array(buffer.readableBytesView) == Array(#"{"type":"pong","ref":"é😀"}"#.utf8))
    }
}

@Suite struct JSONWriterTests {
    @Test func nestingAndCommas() {
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("a", 1)
        json.field("b", false)
        json.beginArray("list")
        json.beginObject()
        json.field("x", true)
        json.endObject()
        json.beginObject()
        json.endObject()
        json.beginObject()
        json.field("y", "z")
        json.field("n", -7)
        json.endObject()
        json.endArray()
        json.beginArray("empty")
        json.endArray()
        json.field("raw", rawJSON: ByteBuffer(string: #""pre\"encoded""#))
        json.field("absent", ifPresent: nil)
        json.field("present", ifPresent: "v")
        json.endObject()
        #expect(String(buffer: json.buffer)
            == #"{"a":1,"b":false,"list":[{"x":true},{},{"y":"z","n":-7}],"empty":[],"raw":"pre\"encoded","present":"v"}"#)
    }

    @Test func emptyObject() {
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("only", ifPresent: nil)
        json.endObject()
        #expect(String(buffer: json.buffer) == "{}")
    }

    @Test func keysAreEscapedToo() throws {
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("k\"e\\y\n", "v")
        json.endObject()
        let object = try parsedObject(String(buffer: json.buffer))
        #expect(object["k\"e\\y\n"] as? String == "v")
    }

    @Test func rawJSONIsCopiedNotConsumed() {
        let raw = ByteBuffer(string: "[1,2]")
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("a", rawJSON: raw)
        json.field("b", rawJSON: raw)
        json.endObject()
        #expect(String(buffer: json.buffer) == #"{"a":[1,2],"b":[1,2]}"#)
        #expect(raw.readableBytes == 5)
    }

    @Test func writesAfterWhatTheBufferHeld() {
        var json = JSONWriter(buffer: ByteBuffer(string: "x"))
        json.beginObject()
        json.endObject()
        #expect(String(buffer: json.buffer) == "x{}")
    }

    @Test func longStringWithManyEscapesRoundTrips() throws {
        var text = ""
        for index in 0..<5_000 { text += index % 7 == 0 ? "\"" : index % 11 == 0 ? "\u{03}" : index % 13 == 0 ? "ü" : "a" }
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("t", text)
        json.endObject()
        #expect(try parsedObject(String(buffer: json.buffer))["t"] as? String == text)
    }
}
