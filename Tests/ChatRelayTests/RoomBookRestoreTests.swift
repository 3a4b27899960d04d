import ChatBus
import ChatProtocol
import Testing
@testable import ChatRelay

@Suite struct RoomBookRestoreTests {
    @Test func restoreKeepsEpochSeqAndHistory() {
        var book = makeBook(messages: 3)
        let journal = (5...8).map { RoomMessage(room: "a", seq: $0, epoch: "j1", from: "u", text: "m\($0)", ts: 100) }
            + [RoomMessage(room: "b", seq: 1, epoch: "j2", from: "u", text: "b1", ts: 100)]
        book.restore(journal, nowMs: 200)
        #expect(book.roomCount == 2)
        let joined = book.join("a", history: 10, nowMs: 200)
        #expect(joined.snapshot == RoomSnapshot(name: "a", epoch: "j1", seq: 8, members: 1))
        #expect(joined.replay.map(\.seq) == [6, 7, 8])
        // The sequence continues where the journal left it.
        #expect(book.publish(room: "a", from: "u", text: "t", nowMs: 300) == RoomMessage(room: "a", seq: 9, epoch: "j1", from: "u", text: "t", ts: 300))
        #expect(book.publish(room: "c", from: "u", text: "t", nowMs: 300).epoch == "e1")
        let held = book.heldMessages
        #expect(held.filter { $0.room == "a" }.map(\.seq) == [7, 8, 9])
        #expect(held.filter { $0.room == "b" }.map(\.seq) == [1])
        #expect(held.count == 5)
    }

    @Test func restoreFollowsAnEpochChange() {
        var book = makeBook()
        book.restore([
            RoomMessage(room: "a", seq: 4, epoch: "x", from: "u", text: "t", ts: 0),
            RoomMessage(room: "a", seq: 1, epoch: "y", from: "u", text: "t", ts: 0),
        ], nowMs: 0)
        let joined = book.join("a", history: 10, nowMs: 0)
        #expect(joined.snapshot.epoch == "y")
        #expect(joined.snapshot.seq == 1)
        #expect(joined.replay.map(\.epoch) == ["y"])
    }

    @Test func restoreDropsExpiredHistoryButKeepsTheSequence() {
        var book = makeBook(maxAgeMs: 1_000)
        book.restore([RoomMessage(room: "a", seq: 7, epoch: "x", from: "u", text: "t", ts: 0)], nowMs: 5_000)
        #expect(book.heldMessages.isEmpty)
        #expect(book.publish(room: "a", from: "u", text: "t", nowMs: 5_000).seq == 8)
    }
}
