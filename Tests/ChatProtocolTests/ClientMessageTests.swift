import NIOCore
import Testing
@testable import ChatProtocol

@Suite struct ClientMessageDecodingTests {
    // MARK: Every request type

    @Test func joinWithEveryField() {
        let result = decode(#"{"type":"join","room":"live:42","since":117,"epoch":"e9c1","history":2,"ref":"j1"}"#)
        #expect(result == .success(.join(room: "live:42", since: 117, epoch: "e9c1", history: 2, ref: "j1")))
    }

    @Test func joinDefaults() {
        let result = decode(#"{"type":"join","room":"lobby"}"#)
        #expect(result == .success(.join(room: "lobby", since: nil, epoch: nil, history: 0, ref: nil)))
    }

    @Test func nullOptionalFieldsCountAsAbsent() {
        let result = decode(#"{"type":"join","room":"lobby","since":null,"epoch":null,"history":null,"ref":null}"#)
        #expect(result == .success(.join(room: "lobby", since: nil, epoch: nil, history: 0, ref: nil)))
        #expect(decode(#"{"type":"history","room":"r","before":null,"limit":null}"#)
            == .success(.history(room: "r", before: nil, limit: 50, ref: nil)))
    }

    @Test func joinBoundaries() {
        #expect(decode(#"{"type":"join","room":"r","since":0}"#) == .success(.join(room: "r", since: 0, epoch: nil, history: 0, ref: nil)))
        #expect(decode(#"{"type":"join","room":"r","history":100}"#) == .success(.join(room: "r", since: nil, epoch: nil, history: 100, ref: nil)))
        #expect(decode(#"{"type":"join","room":"r","since":9007199254740991}"#)
            == .success(.join(room: "r", since: 9_007_199_254_740_991, epoch: nil, history: 0, ref: nil)))
    }

    @Test func leave() {
        #expect(decode(#"{"type":"leave","room":"lobby","ref":"l1"}"#) == .success(.leave(room: "lobby", ref: "l1")))
        #expect(decode(#"{"type":"leave","room":"lobby"}"#) == .success(.leave(room: "lobby", ref: nil)))
    }

    @Test func send() {
        #expect(decode(#"{"type":"send","room":"live:42","text":"hello","ref":"a1"}"#) == .success(.send(room: "live:42", text: "hello", ref: "a1")))
        #expect(decode(#"{"type":"send","room":"r","text":""}"#) == .success(.send(room: "r", text: "", ref: nil)))
        #expect(decode(#"{"type":"send","room":"r","text":"h\u00e9 \ud83d\ude00 \"q\"\n"}"#)
            == .success(.send(room: "r", text: "hé 😀 \"q\"\n", ref: nil)))
    }

    @Test func ping() {
        #expect(decode(#"{"type":"ping","ref":"p1"}"#) == .success(.ping(ref: "p1")))
        #expect(decode(#"{"type":"ping"}"#) == .success(.ping(ref: nil)))
        #expect(decode(#"{"type":"ping","ref":"p1"}"#).map(\.ref) == .success("p1"))
    }

    @Test func historyWithEveryField() {
        let result = decode(#"{"type":"history","room":"r","before":{"epoch":"e1","seq":40},"limit":10,"ref":"h1"}"#)
        #expect(result == .success(.history(room: "r", before: HistoryPosition(epoch: "e1", seq: 40), limit: 10, ref: "h1")))
    }

    @Test func historyDefaults() {
        #expect(decode(#"{"type":"history","room":"r"}"#) == .success(.history(room: "r", before: nil, limit: 50, ref: nil)))
    }

    @Test func historyLimitBoundaries() {
        #expect(decode(#"{"type":"history","room":"r","limit":1}"#) == .success(.history(room: "r", before: nil, limit: 1, ref: nil)))
        #expect(decode(#"{"type":"history","room":"r","limit":200}"#) == .success(.history(room: "r", before: nil, limit: 200, ref: nil)))
        #expect(decode(#"{"type":"history","room":"r","before":{"epoch":"e","seq":0}}"#)
            == .success(.history(room: "r", before: HistoryPosition(epoch: "e", seq: 0), limit: 50, ref: nil)))
    }

    @Test func unknownFieldsAreIgnored() {
        #expect(decode(#"{"type":"ping","ref":"p","extra":{"nested":[1,2,{"x":null}]},"flag":true,"n":1.5}"#) == .success(.ping(ref: "p")))
        #expect(decode(#"{"zzz":1,"type":"leave","room":"r","text":42}"#) == .success(.leave(room: "r", ref: nil)))
    }

    @Test func refOfExactly64CharactersIsAccepted() {
        let ref = String(repeating: "r", count: 64)
        #expect(decode(#"{"type":"ping","ref":"\#(ref)"}"#) == .success(.ping(ref: ref)))
    }

    @Test func textAtTheLimitIsAccepted() {
        #expect(decode(#"{"type":"send","room":"r","text":"12345"}"#, maxTextBytes: 5) == .success(.send(room: "r", text: "12345", ref: nil)))
    }

    // MARK: Errors

    @Test(arguments: [
        "not json", "", "{", #"{"type":"ping""#, "{'type':'ping'}", #"{"type":"ping"} x"#,
        "[]", #"[{"type":"ping"}]"#, "42", "-1.5", #""ping""#, "null", "true",
    ])
    func notAJSONObjectIsBadJSON(_ text: String) throws {
        let error = try #require(decodeError(text))
        #expect(error.code == .badJSON)
        #expect(error.ref == nil)
        #expect(error.room == nil)
    }

    @Test func invalidUTF8IsBadJSON() throws {
        let bytes: [UInt8] = Array(#"{"type":"ping","ref":""#.utf8) + [0xFF, 0xFE] + Array(#""}"#.utf8)
        let result = ClientMessage.decode(ByteBuffer(bytes: bytes), maxTextBytes: 100)
        guard case .failure(let error) = result else {
            Issue.record("decoded invalid UTF-8: \(result)")
            return
        }
        #expect(error.code == .badJSON)
    }

    @Test func missingType() throws {
        let error = try #require(decodeError(#"{"room":"r","ref":"m1"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("type"))
        #expect(error.ref == "m1")
    }

    @Test func typeNotAString() throws {
        let error = try #require(decodeError(#"{"type":7,"ref":"t1"}"#))
        #expect(error.code == .badJSON)
        #expect(error.ref == "t1")
    }

    @Test func unknownTypeEchoesRef() throws {
        let error = try #require(decodeError(#"{"type":"shout","room":"r","ref":"u1"}"#))
        #expect(error.code == .unknownType)
        #expect(error.ref == "u1")
        #expect(error.message.contains("shout"))
        let bare = try #require(decodeError(#"{"type":"JOIN","room":"r"}"#))
        #expect(bare.code == .unknownType)
        #expect(bare.ref == nil)
    }

    @Test(arguments: ["join", "leave", "send", "history"])
    func missingRoom(_ type: String) throws {
        let error = try #require(decodeError(#"{"type":"\#(type)","text":"x","ref":"r1"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("room"))
        #expect(error.ref == "r1")
    }

    @Test(arguments: ["42", "null", "true", #"["r"]"#, #"{"name":"r"}"#])
    func roomNotAString(_ room: String) throws {
        let error = try #require(decodeError(#"{"type":"join","room":\#(room),"ref":"r2"}"#))
        #expect(error.code == .badJSON)
        #expect(error.ref == "r2")
    }

    static let badRooms = ["", String(repeating: "a", count: 65), "a b", "a/b", "café", "комната", "room😀", "a\\u0000b", "a\\\"b", "a*", "a\\nb"]

    @Test(arguments: badRooms)
    func badRoomName(_ room: String) throws {
        for type in ["join", "leave", "send", "history"] {
            let error = try #require(decodeError(#"{"type":"\#(type)","room":"\#(room)","text":"x","ref":"b1"}"#))
            #expect(error.code == .badRoom, "type \(type)")
            #expect(error.ref == "b1", "type \(type)")
        }
    }

    @Test func roomOf64CharactersIsAccepted() {
        let room = String(repeating: "a", count: 60) + "_.:-"
        #expect(decode(#"{"type":"leave","room":"\#(room)"}"#) == .success(.leave(room: room, ref: nil)))
    }

    @Test(arguments: ["-1", "1.5", #""5""#, "true", "[1]", "1e300", "9223372036854775808"])
    func badSince(_ since: String) throws {
        let error = try #require(decodeError(#"{"type":"join","room":"r","since":\#(since),"ref":"s1"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("since"))
        #expect(error.ref == "s1")
    }

    @Test func epochNotAString() throws {
        let error = try #require(decodeError(#"{"type":"join","room":"r","since":1,"epoch":5}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("epoch"))
    }

    @Test(arguments: ["101", "-1", "2.5", #""3""#])
    func badHistory(_ history: String) throws {
        let error = try #require(decodeError(#"{"type":"join","room":"r","history":\#(history),"ref":"h2"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("history"))
        #expect(error.ref == "h2")
    }

    @Test(arguments: ["0", "201", "-5", "1.5", #""10""#])
    func badLimit(_ limit: String) throws {
        let error = try #require(decodeError(#"{"type":"history","room":"r","limit":\#(limit),"ref":"l2"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("limit"))
        #expect(error.ref == "l2")
    }

    @Test(arguments: [
        #""e1:40""#, "40", "[]", "{}", #"{"epoch":"e"}"#, #"{"seq":1}"#, #"{"epoch":1,"seq":1}"#,
        #"{"epoch":"e","seq":-1}"#, #"{"epoch":"e","seq":1.5}"#, #"{"epoch":"e","seq":"1"}"#, #"{"epoch":null,"seq":1}"#,
    ])
    func badBefore(_ before: String) throws {
        let error = try #require(decodeError(#"{"type":"history","room":"r","before":\#(before),"ref":"bf"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("before"))
        #expect(error.ref == "bf")
    }

    @Test func textOverTheLimitIsTooLarge() throws {
        let error = try #require(decodeError(#"{"type":"send","room":"live:1","text":"123456","ref":"big"}"#, maxTextBytes: 5))
        #expect(error.code == .tooLarge)
        #expect(error.room == "live:1")
        #expect(error.ref == "big")
    }

    @Test func textLimitCountsUTF8Bytes() throws {
        // Three characters, six bytes.
        let error = try #require(decodeError(#"{"type":"send","room":"r","text":"ééé"}"#, maxTextBytes: 5))
        #expect(error.code == .tooLarge)
        #expect(error.room == "r")
        #expect(error.ref == nil)
        #expect(decode(#"{"type":"send","room":"r","text":"éé"}"#, maxTextBytes: 4) == .success(.send(room: "r", text: "éé", ref: nil)))
    }

    @Test(arguments: [#""text":42"#, #""text":null"#, #""txt":"hi""#])
    func badText(_ field: String) throws {
        let error = try #require(decodeError(#"{"type":"send","room":"r",\#(field),"ref":"x1"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("text"))
        #expect(error.ref == "x1")
    }

    @Test func refOver64CharactersIsRefusedAndNotEchoed() throws {
        let ref = String(repeating: "r", count: 65)
        let error = try #require(decodeError(#"{"type":"ping","ref":"\#(ref)"}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("ref"))
        #expect(error.ref == nil)
        // Also when something else is wrong with the request.
        let other = try #require(decodeError(#"{"type":"join","room":"a b","ref":"\#(ref)"}"#))
        #expect(other.ref == nil)
    }

    @Test(arguments: ["5", "true", "[]", #"{"a":1}"#])
    func refNotAString(_ ref: String) throws {
        let error = try #require(decodeError(#"{"type":"ping","ref":\#(ref)}"#))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("ref"))
        #expect(error.ref == nil)
    }

    @Test func refIsEchoedWhateverElseIsWrong() throws {
        let cases: [(String, ErrorCode)] = [
            (#"{"ref":"e1"}"#, .badJSON),
            (#"{"type":null,"ref":"e1"}"#, .badJSON),
            (#"{"type":"nope","ref":"e1"}"#, .unknownType),
            (#"{"type":"join","ref":"e1"}"#, .badJSON),
            (#"{"type":"join","room":"","ref":"e1"}"#, .badRoom),
            (#"{"type":"join","room":"r","since":-3,"ref":"e1"}"#, .badJSON),
            (#"{"type":"send","room":"r","ref":"e1"}"#, .badJSON),
            (#"{"type":"history","room":"r","before":1,"ref":"e1"}"#, .badJSON),
        ]
        for (text, code) in cases {
            let error = try #require(decodeError(text))
            #expect(error.code == code, "\(text)")
            #expect(error.ref == "e1", "\(text)")
        }
    }

    // MARK: Hostile input

    @Test func deeplyNestedArraysFailCleanly() throws {
        let depth = 10_000
        let text = String(repeating: "[", count: depth) + String(repeating: "]", count: depth)
        let error = try #require(decodeError(text))
        #expect(error.code == .badJSON)
    }

    @Test func deeplyNestedObjectsFailCleanly() throws {
        let depth = 10_000
        let text = String(repeating: #"{"a":"#, count: depth) + "1" + String(repeating: "}", count: depth)
        let error = try #require(decodeError(text))
        #expect(error.code == .badJSON)
    }

    @Test func deeplyNestedUnknownFieldDoesNotCrash() {
        let depth = 10_000
        let text = #"{"type":"ping","ref":"d","junk":"# + String(repeating: "[", count: depth) + String(repeating: "]", count: depth) + "}"
        switch decode(text) {
        case .success(let message):
            #expect(message == .ping(ref: "d"))
        case .failure(let error):
            #expect(error.code == .badJSON)
        }
    }

    @Test func moderatelyNestedUnknownFieldIsIgnored() {
        let depth = 64
        let text = #"{"type":"ping","junk":"# + String(repeating: "[", count: depth) + String(repeating: "]", count: depth) + "}"
        #expect(decode(text) == .success(.ping(ref: nil)))
    }

    @Test func decodingLeavesTheBufferAlone() {
        let buffer = ByteBuffer(string: #"{"type":"ping"}"#)
        _ = ClientMessage.decode(buffer, maxTextBytes: 10)
        #expect(buffer.readableBytes == 15)
    }
}
