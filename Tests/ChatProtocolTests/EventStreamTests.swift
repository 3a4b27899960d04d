import NIOCore
import Testing
@testable import ChatProtocol

@Suite struct EventStreamEncodingTests {
    static let bob = RoomMessage(room: "live:42", seq: 117, epoch: "e9c1", from: "bob", text: "two\nlines", ts: 1_764_000_000_000)

    @Test func eventCarriesTypeAndTheWebSocketJSONOnOneDataLine() {
        let event = String(buffer: EventStreamBytes.event(.message(Self.bob), allocator: ByteBufferAllocator()))
        #expect(event == "event: message\ndata: " + encoded(.message(Self.bob)) + "\n\n")
        #expect(event.split(separator: "\n").count == 2, "a line break in the text must stay escaped inside the JSON")
    }

    @Test func everyServerMessageNamesItsEventByItsType() {
        let messages: [ServerMessage] = [
            .hello(user: "a", conn: "w0-1", heartbeatSeconds: 30), .joined(room: "r", seq: 0, epoch: "e", members: 1, ref: nil),
            .message(Self.bob), .ack(ref: "x", room: "r", seq: 1), .left(room: "r", ref: nil), .gap(room: "r", from: 1, to: 2, epoch: "e"),
            .pong(ref: nil), .history(room: "r", messages: [], more: false, ref: nil), .error(ProtocolError(.badRoom, "m")),
            .bye(reason: .reload, retryMs: 5),
        ]
        for message in messages {
            #expect(encoded(message).hasPrefix(#"{"type":"\#(message.type)""#))
        }
    }

    @Test func retryPrecedesTheByeEvent() {
        var buffer = ByteBuffer()
        EventStreamBytes.writeRetry(milliseconds: 2500, into: &buffer)
        EventStreamBytes.write(.bye(reason: .shutdown, retryMs: 2500), into: &buffer)
        #expect(String(buffer: buffer) == "retry: 2500\nevent: bye\ndata: {\"type\":\"bye\",\"reason\":\"shutdown\",\"retry_ms\":2500}\n\n")
    }
}

@Suite struct StreamPositionTests {
    @Test func idListsEveryRoomInJoinOrderAndParsesBack() throws {
        var position = StreamPosition()
        let carryIDs = [
            position.advance(by: .joined(room: "live:42", seq: 7, epoch: "9f3c2a1b7d4e8c60", members: 3, ref: nil)),
            position.advance(by: .joined(room: "b", seq: 0, epoch: "00ff", members: 1, ref: nil)),
            position.advance(by: .message(RoomMessage(room: "live:42", seq: 8, epoch: "9f3c2a1b7d4e8c60", from: "x", text: "t", ts: 0))),
        ]
        #expect(carryIDs == [true, true, true])
        #expect(position.id == "live:42/9f3c2a1b7d4e8c60/8,b/00ff/0")
        var line = ByteBuffer()
        position.writeIDLine(into: &line)
        #expect(String(buffer: line) == "id: live:42/9f3c2a1b7d4e8c60/8,b/00ff/0\n")
        #expect(try StreamPosition.parse(position.id[...]).get() == position)
    }

    @Test func joinedDoesNotMoveAResumingRoom() {
        var position = StreamPosition([StreamMark(room: "r", epoch: "old", seq: 5)])
        let carriesID = position.advance(by: .joined(room: "r", seq: 10, epoch: "new", members: 1, ref: nil))
        #expect(carriesID)
        #expect(position["r"] == StreamMark(room: "r", epoch: "old", seq: 5), "the replay after joined is still to come")
        _ = position.advance(by: .gap(room: "r", from: 0, to: 0, epoch: "new"))
        #expect(position["r"] == StreamMark(room: "r", epoch: "new", seq: 0))
        _ = position.advance(by: .gap(room: "r", from: 1, to: 4, epoch: "new"))
        #expect(position["r"] == StreamMark(room: "r", epoch: "new", seq: 4))
    }

    @Test func onlyJoinedMessageAndGapCarryAnID() {
        var position = StreamPosition()
        let silent: [ServerMessage] = [.hello(user: "a", conn: "c", heartbeatSeconds: 1), .error(ProtocolError(.badRoom, "m", room: "r")), .left(room: "r", ref: nil)]
        for message in silent {
            let carriesID = position.advance(by: message)
            #expect(!carriesID)
        }
        #expect(position.marks.isEmpty)
    }

    @Test func resumingPositionComesFromTheOpeningJoins() {
        let request = EventStreamRequest.decode(rooms: "a,b", lastEventID: "b/e1/3", history: nil)
        #expect(StreamPosition(resuming: request.requests) == StreamPosition([StreamMark(room: "b", epoch: "e1", seq: 3)]))
    }

    @Test(arguments: ["garbage", "r/e", "r/e/-1", "r/e/x", "bad room/e/1", "r//1", "r/e/1,r/e/2", "r/e/1,", "r/e/1/2", "r/e\u{1}/1"])
    func malformedIDsAreBadJSONNamingTheID(id: String) {
        let error = refusal(StreamPosition.parse(id[...]))
        #expect(error?.code == .badJSON)
        #expect(error?.message.contains(String(id.prefix(20))) == true)
    }

    @Test func emptyIDIsNoPosition() throws {
        #expect(try StreamPosition.parse("").get().marks.isEmpty)
    }
}

@Suite struct EventStreamRequestTests {
    @Test func roomsOfTheQueryThenThoseOnlyInTheID() {
        let request = EventStreamRequest.decode(rooms: "a,b,a", lastEventID: "b/e1/3,c/e2/9", history: "5")
        #expect(request.requests == [
            .success(.join(room: "a", since: nil, epoch: nil, history: 5, ref: nil)),
            .success(.join(room: "b", since: 3, epoch: "e1", history: 0, ref: nil)),
            .success(.join(room: "c", since: 9, epoch: "e2", history: 0, ref: nil)),
        ])
    }

    @Test func badRoomIsRefusedAndTheOthersGoOn() {
        let request = EventStreamRequest.decode(rooms: "a,no way,b", lastEventID: nil, history: nil)
        #expect(request.requests.count == 3)
        guard case .failure(let error) = request.requests[0] else {
            Issue.record("the bad room comes first: \(request.requests)")
            return
        }
        #expect(error.code == .badRoom && error.room == "no way")
        #expect(request.requests[1] == .success(.join(room: "a", since: nil, epoch: nil, history: 0, ref: nil)))
        #expect(request.requests[2] == .success(.join(room: "b", since: nil, epoch: nil, history: 0, ref: nil)))
    }

    /// One room and nothing else (the usual URL join, read without building lists) reads
    /// as the same request the general way gives; anything else takes the general way.
    @Test func oneRoomAloneIsOneJoin() {
        let join = Result<ClientMessage, ProtocolError>.success(.join(room: "live:42", since: nil, epoch: nil, history: 0, ref: nil))
        #expect(EventStreamRequest.decode(rooms: "live:42", lastEventID: nil, history: nil).requests == [join])
        #expect(EventStreamRequest.decode(rooms: "live:42,", lastEventID: nil, history: nil).requests == [join])
        #expect(EventStreamRequest.decode(rooms: ",live:42,live:42", lastEventID: nil, history: nil).requests == [join])
        #expect(EventStreamRequest.decode(rooms: "", lastEventID: nil, history: nil).requests.isEmpty)
        let bad = EventStreamRequest.decode(rooms: "no way", lastEventID: nil, history: nil).requests
        guard bad.count == 1, case .failure(let error) = bad[0] else {
            Issue.record("a bad room alone is refused: \(bad)")
            return
        }
        #expect(error.code == .badRoom && error.room == "no way")
    }

    @Test func namesAreSplitAtCommasAsCharactersAre() {
        let joined = { (rooms: Substring) in
            EventStreamRequest.decode(rooms: rooms, lastEventID: nil, history: nil).requests.map { request in
                switch request {
                case .success(.join(let room, _, _, _, _)): room
                case .failure(let error): "bad \(error.room ?? "")"
                default: "other"
                }
            }
        }
        #expect(joined(",a,,b,") == ["a", "b"])
        #expect(joined("a,é,b") == ["bad é", "a", "b"])
        // A comma and a combining mark are one Character: no separator, one bad name.
        #expect(joined("a,\u{301}b") == ["bad a,\u{301}b"])
    }

    @Test func badIDIsReportedAndTheRoomsJoinAsWithoutOne() {
        let request = EventStreamRequest.decode(rooms: "a", lastEventID: "a/e/zz", history: nil)
        guard case .failure(let error) = request.requests.first else {
            Issue.record("\(request.requests)")
            return
        }
        #expect(error.code == .badJSON)
        #expect(request.requests.dropFirst().elementsEqual([.success(.join(room: "a", since: nil, epoch: nil, history: 0, ref: nil))]))
    }

    @Test func historyOutOfRangeIsBadJSON() {
        let request = EventStreamRequest.decode(rooms: "a", lastEventID: nil, history: "101")
        guard case .failure(let error) = request.requests.first else {
            Issue.record("\(request.requests)")
            return
        }
        #expect(error.code == .badJSON)
    }
}

@Suite struct StreamedSendTests {
    @Test func roomTextAndRef() throws {
        let send = try StreamedSend.decode(ByteBuffer(string: #"{"room":"r","text":"hi","ref":"a1"}"#), maxTextBytes: 10).get()
        #expect(send == StreamedSend(room: "r", text: "hi", ref: "a1"))
    }

    @Test func theRulesOfAWebSocketSend() {
        #expect(refusal(StreamedSend.decode(ByteBuffer(string: #"{"room":"r","text":"12345678901"}"#), maxTextBytes: 10))?.code == .tooLarge)
        #expect(refusal(StreamedSend.decode(ByteBuffer(string: #"{"room":"bad room","text":"x"}"#), maxTextBytes: 10))?.code == .badRoom)
        #expect(refusal(StreamedSend.decode(ByteBuffer(string: #"{"room":"r"}"#), maxTextBytes: 10))?.code == .badJSON)
        #expect(refusal(StreamedSend.decode(ByteBuffer(string: "[1]"), maxTextBytes: 10))?.code == .badJSON)
        #expect(refusal(StreamedSend.decode(ByteBuffer(string: #"{"room":"r","text":5,"ref":"q"}"#), maxTextBytes: 10))?.ref == "q")
    }
}

@Suite struct RateTableTests {
    @Test func eachKeyHasItsOwnBucket() {
        var table = RateTable(rate: 1, burst: 2, capacity: 10)
        let taken = [table.take("a", now: 0), table.take("a", now: 0), table.take("a", now: 0), table.take("b", now: 0), table.take("a", now: 1)]
        #expect(taken == [true, true, false, true, true], "a burst of 2, then empty; b apart; a refilled at the rate")
    }

    @Test func aFullTableForgetsRefilledBucketsFirstAndStaysBounded() {
        var table = RateTable(rate: 1, burst: 2, capacity: 2)
        _ = table.take("idle", now: 0)
        _ = table.take("busy", now: 10)
        _ = table.take("busy", now: 10)
        let newcomer = table.take("new", now: 10)
        #expect(newcomer)
        #expect(table.count == 2)
        let busy = table.take("busy", now: 10)
        #expect(!busy, "the busy user kept its empty bucket; the refilled one was forgotten")
        for index in 0..<50 { _ = table.take("k\(index)", now: 10) }
        #expect(table.count == 2)
    }
}
