import Foundation
import Testing
import ChatControl
import ChatLink

@Suite struct LineFramerTests {
    @Test func wholeLinesInOneChunk() throws {
        var framer = LineFramer(maximumLine: 100)
        let lines = try framer.append(Array("one\ntwo\n\nthree\n".utf8))
        #expect(lines == [Array("one".utf8), Array("two".utf8), [], Array("three".utf8)])
    }

    @Test func linesSplitAcrossChunks() throws {
        var framer = LineFramer(maximumLine: 100)
        #expect(try framer.append(Array("he".utf8)) == [])
        #expect(try framer.append(Array("llo".utf8)) == [])
        #expect(try framer.append(Array(" world\nsec".utf8)) == [Array("hello world".utf8)])
        #expect(try framer.append(Array("ond\nthi".utf8)) == [Array("second".utf8)])
        #expect(try framer.append([]) == [])
        #expect(try framer.append(Array("rd\n".utf8)) == [Array("third".utf8)])
    }

    @Test func byteByByteGivesTheSameLines() throws {
        let text = Array("{\"type\":\"ready\"}\n{\"type\":\"stop\"}\nx\n".utf8)
        var framer = LineFramer(maximumLine: 100)
        var lines: [[UInt8]] = []
        for byte in text { lines += try framer.append([byte]) }
        #expect(lines == [Array("{\"type\":\"ready\"}".utf8), Array("{\"type\":\"stop\"}".utf8), Array("x".utf8)])
    }

    @Test func acceptsAnyCollection() throws {
        var framer = LineFramer()
        #expect(framer.maximumLine == 65_536)
        #expect(try framer.append(Data("a\nb".utf8)) == [Array("a".utf8)])
        #expect(try framer.append(Array("c\n".utf8)[...]) == [Array("bc".utf8)])
    }

    @Test func partialLineUpToTheMaximumIsKept() throws {
        var framer = LineFramer(maximumLine: 8)
        #expect(try framer.append([UInt8](repeating: 0x61, count: 8)) == [])
        #expect(try framer.append([0x0A]) == [[UInt8](repeating: 0x61, count: 8)])
    }

    @Test func overLongPartialLineIsRefused() throws {
        var framer = LineFramer(maximumLine: 8)
        #expect(try framer.append(Array("ok\n".utf8)) == [Array("ok".utf8)])
        #expect(try framer.append([UInt8](repeating: 0x61, count: 5)) == [])
        #expect(throws: LineFramer.LineTooLong.self) { try framer.append([UInt8](repeating: 0x61, count: 4)) }
    }

    @Test func overLongLineWithoutNewlineInOneChunkIsRefused() {
        var framer = LineFramer(maximumLine: 16)
        #expect(throws: LineFramer.LineTooLong.self) { try framer.append([UInt8](repeating: 0x7B, count: 1_000)) }
    }
}

@Suite struct LinkMessageTests {
    static let busyStats: ChildStats = {
        var stats = ChildStats(connections: 12, rooms: 3, messagesIn: 1_000_000, messagesOut: 9_000_000_000)
        stats.residentBytes = 52_428_800
        stats.joins = 4
        stats.deliveries = 5
        stats.bytesOut = 6
        stats.slowConsumerDisconnects = 7
        stats.floodDisconnects = 8
        stats.busLatencyBuckets = [0, 1, 2, 3]
        stats.busLatencySumSeconds = 0.375
        return stats
    }()

    @Test(arguments: [
        LinkMessage.ready,
        .heartbeat(ChildStats()),
        .heartbeat(busyStats),
        .stop(reason: .shutdown, windowMs: 0, keepAccepting: false),
        .stop(reason: .drain, windowMs: 30_000, keepAccepting: true),
        .stop(reason: .reload, windowMs: 5_000, keepAccepting: false),
        .kick(user: "alice"),
        .kick(user: "\"q\"\n😀"),
        .roomsRequest(id: 3, top: 10),
        .rooms(id: 3, rooms: []),
        .rooms(id: 4, rooms: [RoomStat(room: "live:42", members: 5210, seq: 118, messagesPerSecond: 12.5),
                              RoomStat(room: "lobby", members: 0, seq: 0, messagesPerSecond: 0)]),
    ])
    func roundTrip(_ message: LinkMessage) throws {
        let line = message.encodedLine()
        #expect(line.last == UInt8(ascii: "\n"))
        #expect(!line.dropLast().contains(UInt8(ascii: "\n")))
        #expect(try LinkMessage.decode(line: line.dropLast()) == message)
    }

    @Test func roundTripThroughTheFramer() throws {
        let messages: [LinkMessage] = [.ready, .heartbeat(Self.busyStats), .stop(reason: .drain, windowMs: 10, keepAccepting: true), .kick(user: "bob")]
        let stream = messages.flatMap { $0.encodedLine() }
        var framer = LineFramer()
        var decoded: [LinkMessage] = []
        // Odd-sized chunks so lines straddle them.
        var index = 0
        while index < stream.count {
            let end = min(stream.count, index + 7)
            for line in try framer.append(stream[index..<end]) { decoded.append(try LinkMessage.decode(line: line)) }
            index = end
        }
        #expect(decoded == messages)
    }

    @Test func wireFieldNames() throws {
        let line = LinkMessage.stop(reason: .reload, windowMs: 250, keepAccepting: true).encodedLine()
        let stop = try #require(JSONSerialization.jsonObject(with: Data(line)) as? [String: Any])
        #expect(stop["type"] as? String == "stop")
        #expect(stop["reason"] as? String == "reload")
        #expect(stop["window_ms"] as? Int == 250)
        #expect(stop["keep_accepting"] as? Bool == true)
        let ready = try #require(JSONSerialization.jsonObject(with: Data(LinkMessage.ready.encodedLine())) as? [String: Any])
        #expect(ready.count == 1)
        #expect(ready["type"] as? String == "ready")
    }

    @Test func decodesHandWrittenLines() throws {
        #expect(try LinkMessage.decode(line: Array(#"{"type":"ready","extra":1}"#.utf8)) == .ready)
        // `keep_accepting` is optional on the wire.
        #expect(try LinkMessage.decode(line: Array(#"{"type":"stop","reason":"drain","window_ms":7}"#.utf8))
            == .stop(reason: .drain, windowMs: 7, keepAccepting: false))
        #expect(try LinkMessage.decode(line: Array(#"{"type":"kick","user":"mallory"}"#.utf8)) == .kick(user: "mallory"))
    }

    @Test(arguments: [
        "", "garbage", "[]", #"{}"#, #"{"type":"reboot"}"#, #"{"type":"stop","reason":"nap","window_ms":1}"#,
        #"{"type":"stop","reason":"drain"}"#, #"{"type":"heartbeat"}"#, #"{"type":"heartbeat","stats":{"connections":1}}"#,
        #"{"type":"kick"}"#, #"{"type":"rooms_request","id":1}"#, #"{"type":"ready"} trailing"#,
    ])
    func refusesBadLines(_ line: String) {
        #expect(throws: (any Error).self) { try LinkMessage.decode(line: Array(line.utf8)) }
    }
}
