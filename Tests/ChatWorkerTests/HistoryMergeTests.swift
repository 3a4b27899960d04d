import ChatProtocol
import Testing
@testable import ChatWorker

@Suite struct HistoryMergeTests {
    private func at(_ seq: Int, ts: Int, _ epoch: String = "e2") -> RoomMessage {
        RoomMessage(room: "r", seq: seq, epoch: epoch, from: "u", text: "", ts: ts)
    }

    @Test func bothSourcesWithoutDuplicatesInTimeOrder() {
        let archived = (messages: [at(8, ts: 80, "e1"), at(1, ts: 100), at(2, ts: 110)], more: true)
        let recent = (messages: [at(2, ts: 110), at(3, ts: 120)], more: false)
        let page = HistoryMerge.page(archived: archived, recent: recent, limit: 10)
        #expect(page?.messages.map { "\($0.epoch):\($0.seq)" } == ["e1:8", "e2:1", "e2:2", "e2:3"])
        #expect(page?.more == true)
    }

    @Test func theNewestLimitAndWhetherMoreExist() {
        let recent = (messages: (1...5).map { at($0, ts: $0) }, more: false)
        let page = HistoryMerge.page(archived: nil, recent: recent, limit: 2)
        #expect(page?.messages.map(\.seq) == [4, 5])
        #expect(page?.more == true)
        #expect(HistoryMerge.page(archived: nil, recent: nil, limit: 2) == nil)
    }

    @Test func theEndOfBothSourcesIsNoMore() {
        let archived = (messages: [at(1, ts: 100)], more: false)
        let recent = (messages: [at(1, ts: 100), at(2, ts: 110)], more: false)
        #expect(HistoryMerge.page(archived: archived, recent: recent, limit: 10)?.more == false)
    }

    @Test func withoutTheArchiveTheBusNeverSaysItIsTheBeginning() {
        // The bus's oldest message is not the room's first: only the archive could tell.
        let recent = (messages: [at(7, ts: 70), at(8, ts: 80)], more: false)
        let page = HistoryMerge.page(archived: nil, recent: recent, limit: 10)
        #expect(page?.messages.map(\.seq) == [7, 8])
        #expect(page?.more == true)
    }

    @Test func withoutTheArchiveAPageTheBusHoldsNothingOfIsUnanswered() {
        #expect(HistoryMerge.page(archived: nil, recent: (messages: [], more: false), limit: 10) == nil)
        // The archive alone answers, even with nothing (the room's beginning).
        #expect(HistoryMerge.page(archived: (messages: [], more: false), recent: nil, limit: 10)?.more == false)
    }
}
