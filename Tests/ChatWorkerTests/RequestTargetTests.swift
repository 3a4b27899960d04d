import Testing
@testable import ChatWorker

@Suite struct RequestTargetTests {
    @Test func pathAndParameters() {
        let target = RequestTarget("/ws?user=alice&rooms=live:42,live:43&history=5")
        #expect(target.path == "/ws")
        #expect(target.query["user"] == "alice")
        #expect(target.query["rooms"] == "live:42,live:43")
        #expect(target.query["history"] == "5")
        #expect(target.query["token"] == nil)
        #expect(target.query["use"] == nil, "a prefix of a key is not the key")
    }

    @Test func noQuery() {
        let target = RequestTarget("/health")
        #expect(target.path == "/health")
        #expect(target.query["user"] == nil)
        #expect(target.query.all.isEmpty)
        #expect(RequestTarget("/ws?").path == "/ws")
        #expect(RequestTarget("/ws?").query.all.isEmpty)
    }

    @Test func oddPairs() {
        let target = RequestTarget("/ws?&flag&user=a&&user=b&=x&empty=")
        #expect(target.query["flag"] == "", "a key without = has the value \"\"")
        #expect(target.query["user"] == "b", "a repeated key's last value wins")
        #expect(target.query[""] == "x")
        #expect(target.query["empty"] == "")
        #expect(target.query.all == ["flag": "", "user": "b", "": "x", "empty": ""])
    }

    @Test func valuesArePercentDecodedAndKeysAreNot() {
        let target = RequestTarget("/ws?user=al%69ce&text=a+b%2Cc&bad=%zz&k%65y=v")
        #expect(target.query["user"] == "alice")
        #expect(target.query["text"] == "a b,c")
        #expect(target.query["bad"] == "%zz", "a malformed escape is kept as it is")
        #expect(target.query["key"] == nil)
        #expect(target.query["k%65y"] == "v")
        #expect(RequestTarget("/ws?a=%4&b=%&c=100%25").query.all == ["a": "%4", "b": "%", "c": "100%"])
    }

    @Test func aQuestionMarkInTheQueryBelongsToIt() {
        let target = RequestTarget("/ws?user=a?b")
        #expect(target.path == "/ws")
        #expect(target.query["user"] == "a?b")
    }
}
