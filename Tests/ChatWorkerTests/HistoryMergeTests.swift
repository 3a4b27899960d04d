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
}
