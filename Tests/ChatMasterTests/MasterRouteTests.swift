import ChatControl
import Foundation
import Testing
@testable import ChatMaster

@Suite struct MasterRouteTests {
    private func head(_ requestLine: String, _ headers: [String] = []) -> String {
        ([requestLine] + headers).joined(separator: "\r\n") + "\r\n\r\n"
    }

    private func basic(_ user: String, _ password: String) -> String {
        "Authorization: Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
    }

    @Test func pagesWithoutAKeyAreOpen() {
        #expect(MasterRoute.of(head: head("GET /metrics HTTP/1.1"), apiKey: "") == .page(.metrics))
        #expect(MasterRoute.of(head: head("GET /status HTTP/1.1"), apiKey: "") == .page(.statusPage))
        #expect(MasterRoute.of(head: head("GET /status.json?t=1 HTTP/1.1"), apiKey: "") == .page(.statusJSON))
    }

    @Test func unknownPathsAndMethodsAreNotFound() {
        for line in ["GET / HTTP/1.1", "GET /status.jsonx HTTP/1.1", "GET /metricsx HTTP/1.1", "POST /status.json HTTP/1.1",
                     "GET /status/ HTTP/1.1", "garbage"] {
            #expect(MasterRoute.of(head: head(line), apiKey: "k") == .notFound, "\(line)")
        }
    }

    @Test func theStatusPagesNeedTheKeyWhenOneIsSet() {
        let key = "s3cret-key"
        for page in ["/status", "/status.json"] {
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1"), apiKey: key) == .unauthorized)
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1", ["Authorization: Bearer wrong"]), apiKey: key) == .unauthorized)
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1", [basic("op", "wrong")]), apiKey: key) == .unauthorized)
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1", ["Authorization: Basic !!!"]), apiKey: key) == .unauthorized)
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1", ["authorization: bearer \(key)"]), apiKey: key) != .unauthorized)
            #expect(MasterRoute.of(head: head("GET \(page) HTTP/1.1", ["Host: x", basic("anyone", key)]), apiKey: key) != .unauthorized)
        }
        // Scrapers are not asked for it.
        #expect(MasterRoute.of(head: head("GET /metrics HTTP/1.1"), apiKey: key) == .page(.metrics))
    }

    @Test func aPasswordMayHoldColons() {
        #expect(MasterRoute.presentedKey("Basic " + Data("op:a:b".utf8).base64EncodedString()) == "a:b")
        #expect(MasterRoute.presentedKey("Digest x") == nil)
    }

    @Test func theUnauthorizedAnswerAsksTheBrowserForTheKey() {
        let text = String(decoding: MasterAnswer.unauthorized.bytes, as: UTF8.self)
        #expect(text.hasPrefix("HTTP/1.1 401 Unauthorized\r\n"))
        #expect(text.contains("\r\nWWW-Authenticate: Basic realm=\"chatgw status\""))
    }
}

@Suite struct TopRoomsTests {
    @Test func asksOnceUntilAnsweredOrGivenUp() {
        var rooms = TopRooms()
        let asked = [rooms.shouldAsk(at: 100), rooms.shouldAsk(at: 101)]
        #expect(asked == [true, false], "a second request while one is in flight")
        rooms.answered(ControlResponse(ok: true, rooms: [RoomStat(room: "a", members: 2, seq: 3, messagesPerSecond: 1)]))
        #expect(rooms.rooms?.map(\.room) == ["a"])
        let later = [rooms.shouldAsk(at: 101.5), rooms.shouldAsk(at: 102), rooms.shouldAsk(at: 101.5 + TopRooms.answerTimeout)]
        #expect(later == [true, false, true], "asks after an answer, and again once the request is given up")
    }

    @Test func aFailureHidesTheOldRooms() {
        var rooms = TopRooms()
        rooms.answered(ControlResponse(ok: true, rooms: [RoomStat(room: "a", members: 2, seq: 3, messagesPerSecond: 1)]))
        rooms.answered(.failure("the relay is not running"))
        #expect(rooms.rooms == nil)
        #expect(rooms.error == "the relay is not running")
    }
}
