import NIOCore
import Testing
@testable import ChatProtocol

private func post(_ json: String, maxTextBytes: Int = 4096) -> Result<PostedMessage, ProtocolError> {
    PostedMessage.decode(ByteBuffer(string: json), maxTextBytes: maxTextBytes)
}

private func postError(_ json: String, maxTextBytes: Int = 4096, sourceLocation: SourceLocation = #_sourceLocation) -> ProtocolError? {
    refusal(post(json, maxTextBytes: maxTextBytes), sourceLocation: sourceLocation)
}

private func query(_ pairs: [Substring: Substring]) -> Result<HistoryQuery, ProtocolError> {
    HistoryQuery.decode(pairs)
}

/// The API body `{"text","from"}` goes through the same reading and field rules as `send`.
@Suite struct PostedMessageTests {
    @Test func textAndFrom() {
        #expect(post(#"{"text":"hello","from":"bot.1"}"#) == .success(PostedMessage(text: "hello", from: "bot.1")))
    }

    @Test func fromDefaultsToSystem() {
        #expect(post(#"{"text":"hi"}"#) == .success(PostedMessage(text: "hi", from: "system")))
        #expect(post(#"{"text":"hi","from":null}"#) == .success(PostedMessage(text: "hi", from: "system")))
    }

    @Test func unknownFieldsAreIgnoredAndTextIsUnescaped() {
        #expect(post(#"{"pad":[1,{"a":null}],"text":"h\u00e9 \ud83d\ude00 \"q\"\n\u0000"}"#)
            == .success(PostedMessage(text: "hé 😀 \"q\"\n\u{0}", from: "system")))
    }

    @Test(arguments: ["", "this is not json", #"["text"]"#, #""text""#, "42", "null", #"{"text":"a"} x"#,
                      #"{"text":"a"}{"text":"b"}"#, #"{"text":"a","x":NaN}"#, #"{"text":"a","x":1e400}"#, "{'text':'a'}"])
    func notOneJSONObjectIsBadJSON(_ body: String) throws {
        let error = try #require(postError(body))
        #expect(error.code == .badJSON)
        #expect(error.ref == nil && error.room == nil)
    }

    @Test(arguments: [#"{"from":"bot"}"#, #"{"text":5}"#, #"{"text":null}"#, #"{"text":true}"#, #"{"text":["a"]}"#, #"{"text":{"a":"b"}}"#])
    func textMissingOrNotAStringIsBadJSON(_ body: String) throws {
        let error = try #require(postError(body))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("text"))
    }

    @Test func textLimitIsInclusiveAndCountsUTF8Bytes() throws {
        #expect(post(#"{"text":"12345"}"#, maxTextBytes: 5) == .success(PostedMessage(text: "12345", from: "system")))
        #expect(post(#"{"text":"éé"}"#, maxTextBytes: 4) == .success(PostedMessage(text: "éé", from: "system")))
        let error = try #require(postError(#"{"text":"ééé"}"#, maxTextBytes: 5))
        #expect(error.code == .tooLarge)
        #expect(error.message.contains("5"))
        #expect(error.room == nil)
    }

    @Test(arguments: [#""""#, #""a b""#, "\"\(String(repeating: "f", count: 33))\"", #""é""#, #""a:b""#,
                      "5", "true", #"["alice"]"#, #"{"name":"alice"}"#])
    func fromThatIsNotAUserNameIsBadUser(_ from: String) throws {
        let error = try #require(postError(#"{"text":"x","from":\#(from)}"#))
        #expect(error.code == .badUser)
        #expect(error.message.contains("from"))
    }

    @Test func textIsCheckedBeforeFrom() throws {
        #expect(try #require(postError(#"{"text":5,"from":"a b"}"#)).code == .badJSON)
        #expect(try #require(postError(#"{"text":"123456","from":"a b"}"#, maxTextBytes: 5)).code == .tooLarge)
    }

    /// A duplicated key: the first value counts, as for a WebSocket request (JSONSerialization,
    /// which the API used before, took the last one).
    @Test func duplicateKeysTakeTheFirstValueOnBothEntrances() {
        #expect(post(#"{"text":"a","text":"b"}"#) == .success(PostedMessage(text: "a", from: "system")))
        #expect(post(#"{"text":"a","text":5}"#) == .success(PostedMessage(text: "a", from: "system")))
        #expect(decode(#"{"type":"send","room":"r","text":"a","text":"b"}"#) == .success(.send(room: "r", text: "a", ref: nil)))
    }

    /// The same text is accepted or refused alike by the API and by `send`, with the same error.
    @Test(arguments: ["", "x", "12345", "123456", "éé", "ééé", "\\u00e9\\u00e9"])
    func sameTextRuleAsSend(_ text: String) {
        let api = post(#"{"text":"\#(text)"}"#, maxTextBytes: 5)
        let ws = decode(#"{"type":"send","room":"r","text":"\#(text)"}"#, maxTextBytes: 5)
        switch (api, ws) {
        case (.success(let posted), .success(.send(_, let sent, _))):
            #expect(posted.text == sent)
        case (.failure(let apiError), .failure(let wsError)):
            #expect(apiError.code == wsError.code)
            #expect(apiError.message == wsError.message)
        default:
            Issue.record("API \(api) but send \(ws)")
        }
    }

    @Test func maximumBodyHoldsTheLargestEscapedText() {
        let limit = 100
        let text = String(repeating: "\u{1}", count: limit)  // each byte escaped as \u0001
        var json = JSONWriter(buffer: ByteBuffer())
        json.beginObject()
        json.field("text", text)
        json.field("from", String(repeating: "f", count: 32))
        json.endObject()
        #expect(json.buffer.readableBytes <= PostedMessage.maximumBodyBytes(maxTextBytes: limit))
        #expect(PostedMessage.maximumBodyBytes(maxTextBytes: 4096) == 4096 * 6 + 1024)
    }
}

/// `?before_epoch=&before_seq=&limit=` of the API's message pages: the `history` rules.
@Suite struct HistoryQueryTests {
    @Test func defaults() {
        #expect(query([:]) == .success(HistoryQuery(before: nil, limit: 50)))
    }

    @Test func everyParameter() {
        #expect(query(["before_epoch": "e1", "before_seq": "40", "limit": "10"])
            == .success(HistoryQuery(before: HistoryPosition(epoch: "e1", seq: 40), limit: 10)))
        #expect(query(["before_epoch": "e1", "before_seq": "0"]) == .success(HistoryQuery(before: HistoryPosition(epoch: "e1", seq: 0), limit: 50)))
    }

    @Test(arguments: [["before_epoch": "e1"], ["before_seq": "4"], ["before_epoch": "e1", "before_seq": "-1"],
                      ["before_epoch": "e1", "before_seq": "x"], ["before_epoch": "e1", "before_seq": ""]] as [[Substring: Substring]])
    func anIncompleteOrBadPositionIsIgnored(_ pairs: [Substring: Substring]) {
        #expect(query(pairs) == .success(HistoryQuery(before: nil, limit: 50)))
    }

    @Test(arguments: ["0", "201", "-1", "", "abc", "1.5", "10 "] as [Substring])
    func limitOutOfRangeIsBadJSON(_ limit: Substring) throws {
        let error = try #require(refusal(query(["limit": limit])))
        #expect(error.code == .badJSON)
        #expect(error.message.contains("limit"))
    }

    /// The same bounds and the same error as a WebSocket `history` request's `limit`.
    @Test(arguments: [0, 1, 50, 200, 201])
    func sameLimitRuleAsHistory(_ limit: Int) {
        let api = query(["limit": Substring(String(limit))])
        let ws = decode(#"{"type":"history","room":"r","limit":\#(limit)}"#)
        switch (api, ws) {
        case (.success(let page), .success(.history(_, _, let wsLimit, _))):
            #expect(page.limit == wsLimit && page.limit == limit)
        case (.failure(let apiError), .failure(let wsError)):
            #expect(apiError == wsError)
        default:
            Issue.record("API \(api) but history \(ws)")
        }
    }
}

@Suite struct NameCheckTests {
    @Test func checkedRoom() throws {
        #expect(try Names.checkedRoom("live:42") == "live:42")
        #expect(throws: ProtocolError.self) { try Names.checkedRoom("a b") }
        do {
            _ = try Names.checkedRoom(String(repeating: "r", count: 65))
            Issue.record("a 65-character room passed")
        } catch {
            #expect(error.code == .badRoom)
        }
    }

    @Test func checkedUser() throws {
        #expect(try Names.checkedUser("alice") == "alice")
        do {
            _ = try Names.checkedUser("a b")
            Issue.record("a b passed")
        } catch {
            #expect(error.code == .badUser)
            #expect(!error.message.contains("field"))
        }
        do {
            _ = try Names.checkedUser("", field: "from")
            Issue.record("an empty name passed")
        } catch {
            #expect(error.code == .badUser)
            #expect(error.message.contains(#""from""#))
        }
    }

    /// `room` in a request and the room of an API path are refused alike.
    @Test func roomFieldUsesTheSameCheck() throws {
        let error = try #require(decodeError(#"{"type":"join","room":"a b"}"#))
        do {
            _ = try Names.checkedRoom("a b")
            Issue.record("a b passed")
        } catch let checked {
            #expect(checked == error)
        }
    }
}
