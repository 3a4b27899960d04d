import ChatBus
import ChatProtocol
import Testing
@testable import ChatRelay

/// A book whose epochs are "e1", "e2", ... in creation order.
func makeBook(messages: Int = 100, maxAgeMs: Int = 3_600_000) -> RoomBook {
    var next = 0
    return RoomBook(limits: .init(historyMessages: messages, historyMaxAgeMs: maxAgeMs), makeEpoch: {
        next += 1
        return "e\(next)"
    })
}

extension RoomBook {
    /// Publishes `count` messages to `room`, `stepMs` apart from `startMs`.
    mutating func fill(_ room: String, count: Int, startMs: Int = 0, stepMs: Int = 1) {
        for index in 0..<count { _ = publish(room: room, from: "u", text: "m\(index + 1)", nowMs: startMs + index * stepMs) }
    }

    /// A join with the arguments a test does not care about defaulted.
    mutating func join(_ room: String, link: LinkID = 1, members: Int = 1, since: Int? = nil, epoch: String? = nil,
                       history: Int = 0, nowMs: Int = 0) -> (snapshot: RoomSnapshot, replay: [RoomMessage], gap: Gap?) {
        join(room: room, link: link, members: members, since: since, epoch: epoch, history: history, nowMs: nowMs)
    }

    func members(_ room: String) -> Int? { rooms[room]?.members }

    func links(_ room: String) -> Set<LinkID>? { interestedLinks(in: room).map { Set($0) } }
}

@Suite struct RoomBookPublishTests {
    @Test func publishAssignsSequentialSeqsInTheRoomsEpoch() {
        var book = makeBook()
        #expect(book.publish(room: "a", from: "alice", text: "one", nowMs: 1_000)
            == RoomMessage(room: "a", seq: 1, epoch: "e1", from: "alice", text: "one", ts: 1_000))
        #expect(book.publish(room: "a", from: "bob", text: "two", nowMs: 1_001)
            == RoomMessage(room: "a", seq: 2, epoch: "e1", from: "bob", text: "two", ts: 1_001))
        #expect(book.publish(room: "a", from: "alice", text: "three", nowMs: 1_002).seq == 3)
        // Another room has its own sequence and epoch.
        #expect(book.publish(room: "b", from: "carol", text: "x", nowMs: 1_003)
            == RoomMessage(room: "b", seq: 1, epoch: "e2", from: "carol", text: "x", ts: 1_003))
        #expect(book.publish(room: "a", from: "alice", text: "four", nowMs: 1_004).epoch == "e1")
        #expect(book.roomCount == 2)
    }

    @Test func joiningFirstCreatesTheRoomAndItsEpoch() {
        var book = makeBook()
        let result = book.join("a", nowMs: 0)
        #expect(result.snapshot == RoomSnapshot(name: "a", epoch: "e1", seq: 0, members: 1))
        #expect(result.replay.isEmpty)
        #expect(result.gap == nil)
        #expect(book.publish(room: "a", from: "u", text: "t", nowMs: 1).epoch == "e1")
        #expect(book.publish(room: "b", from: "u", text: "t", nowMs: 1).epoch == "e2")
    }

    @Test func historyKeepsTheNewestByCount() {
        var book = makeBook(messages: 3)
        book.fill("a", count: 5)
        let result = book.join("a", history: 100, nowMs: 10)
        #expect(result.replay.map(\.seq) == [3, 4, 5])
        #expect(result.replay.map(\.text) == ["m3", "m4", "m5"])
        #expect(result.snapshot.seq == 5)
    }

    @Test func historyOfZeroHoldsNothing() {
        var book = makeBook(messages: 0)
        book.fill("a", count: 3)
        let result = book.join("a", since: 1, epoch: "e1", history: 100, nowMs: 10)
        #expect(result.replay.isEmpty)
        #expect(result.snapshot.seq == 3)
        #expect(result.gap == Gap(from: 2, to: 3, epoch: "e1"))
    }

    @Test func historyDropsMessagesOlderThanTheMaximumAge() {
        var book = makeBook(maxAgeMs: 1_000)
        _ = book.publish(room: "a", from: "u", text: "t", nowMs: 0)
        _ = book.publish(room: "a", from: "u", text: "t", nowMs: 500)
        _ = book.publish(room: "a", from: "u", text: "t", nowMs: 1_500)
        // At 1500 the oldest allowed is 500: seq 1 is gone, seq 2 is exactly at the edge.
        #expect(book.join("a", history: 10, nowMs: 1_500).replay.map(\.seq) == [2, 3])
        #expect(book.join("a", history: 10, nowMs: 1_501).replay.map(\.seq) == [3])
        let late = book.join("a", history: 10, nowMs: 2_501)
        #expect(late.replay.isEmpty)
        #expect(late.snapshot.seq == 3)
        #expect(late.snapshot.epoch == "e1")
    }
}

@Suite struct RoomBookJoinTests {
    @Test func joinWithoutSinceReplaysTheLastN() {
        var book = makeBook()
        book.fill("a", count: 5)
        let none = book.join("a", history: 0)
        #expect(none.replay.isEmpty)
        #expect(none.gap == nil)
        #expect(none.snapshot == RoomSnapshot(name: "a", epoch: "e1", seq: 5, members: 1))
        #expect(book.join("a", history: 1).replay.map(\.seq) == [5])
        #expect(book.join("a", history: 2).replay.map(\.seq) == [4, 5])
        let all = book.join("a", history: 100)
        #expect(all.replay.map(\.seq) == [1, 2, 3, 4, 5])
        #expect(all.gap == nil)
    }

    @Test func resumeWithinHistoryReplaysExactlyTheLaterMessages() {
        var book = makeBook()
        book.fill("a", count: 5)
        let resumed = book.join("a", since: 3, epoch: "e1")
        #expect(resumed.replay.map(\.seq) == [4, 5])
        #expect(resumed.replay.allSatisfy { $0.epoch == "e1" && $0.room == "a" })
        #expect(resumed.gap == nil)
        #expect(book.join("a", since: 0, epoch: "e1").replay.map(\.seq) == [1, 2, 3, 4, 5])
        #expect(book.join("a", since: 0, epoch: "e1").gap == nil)
        let upToDate = book.join("a", since: 5, epoch: "e1")
        #expect(upToDate.replay.isEmpty)
        #expect(upToDate.gap == nil)
    }

    @Test func resumeWithoutEpochIsTakenAsTheCurrentOne() {
        var book = makeBook()
        book.fill("a", count: 5)
        let resumed = book.join("a", since: 3, epoch: nil)
        #expect(resumed.replay.map(\.seq) == [4, 5])
        #expect(resumed.gap == nil)
    }

    @Test func resumeWithHistoryGetsTheUnionOfBoth() {
        var book = makeBook()
        book.fill("a", count: 5)
        #expect(book.join("a", since: 3, epoch: "e1", history: 1).replay.map(\.seq) == [4, 5])
        #expect(book.join("a", since: 4, epoch: "e1", history: 3).replay.map(\.seq) == [3, 4, 5])
    }

    @Test func resumeAheadOfTheRoomReplaysNothing() {
        var book = makeBook()
        book.fill("a", count: 5)
        let result = book.join("a", since: 9, epoch: "e1")
        #expect(result.replay.isEmpty)
        #expect(result.gap == nil)
    }

    @Test func resumeOlderThanHistoryGetsAGapThenAllHeld() {
        var book = makeBook(messages: 3)
        book.fill("a", count: 10)  // holds 8, 9, 10
        let old = book.join("a", since: 2, epoch: "e1")
        #expect(old.gap == Gap(from: 3, to: 7, epoch: "e1"))
        #expect(old.replay.map(\.seq) == [8, 9, 10])
        #expect(book.join("a", since: 6, epoch: "e1").gap == Gap(from: 7, to: 7, epoch: "e1"))
        let edge = book.join("a", since: 7, epoch: "e1")
        #expect(edge.gap == nil)
        #expect(edge.replay.map(\.seq) == [8, 9, 10])
    }

    @Test func resumeAfterEverythingExpiredGapsToTheLatestSeq() {
        var book = makeBook(maxAgeMs: 1_000)
        book.fill("a", count: 3)
        let result = book.join("a", since: 1, epoch: "e1", nowMs: 5_000)
        #expect(result.gap == Gap(from: 2, to: 3, epoch: "e1"))
        #expect(result.replay.isEmpty)
    }

    @Test func otherEpochWithFullHistoryGapsZeroAndReplaysFromOne() {
        var book = makeBook()
        book.fill("a", count: 3)
        let result = book.join("a", since: 10, epoch: "old")
        #expect(result.gap == Gap(from: 0, to: 0, epoch: "e1"))
        #expect(result.replay.map(\.seq) == [1, 2, 3])
        #expect(result.snapshot.epoch == "e1")
    }

    @Test func otherEpochWithTrimmedHistoryGapsUpToTheFirstHeld() {
        var book = makeBook(messages: 3)
        book.fill("a", count: 10)
        // `since` is from the old epoch, so it says nothing about this one: even since 9 replays all held.
        for since in [0, 9, 50] {
            let result = book.join("a", since: since, epoch: "old")
            #expect(result.gap == Gap(from: 1, to: 7, epoch: "e1"), "since \(since)")
            #expect(result.replay.map(\.seq) == [8, 9, 10], "since \(since)")
        }
    }

    @Test func otherEpochWithNothingHeld() {
        var book = makeBook(maxAgeMs: 1_000)
        book.fill("a", count: 3)
        let expired = book.join("a", since: 3, epoch: "old", nowMs: 10_000)
        #expect(expired.gap == Gap(from: 1, to: 3, epoch: "e1"))
        #expect(expired.replay.isEmpty)
        // A room that never had a message: nothing of its epoch is missing.
        let fresh = book.join("new", since: 3, epoch: "old")
        #expect(fresh.gap == Gap(from: 0, to: 0, epoch: "e2"))
        #expect(fresh.replay.isEmpty)
        #expect(fresh.snapshot == RoomSnapshot(name: "new", epoch: "e2", seq: 0, members: 1))
    }
}

@Suite struct RoomBookMembershipTests {
    @Test func membersAreTheSumOverLinks() {
        var book = makeBook()
        #expect(book.join("r", link: 1, members: 2).snapshot.members == 2)
        #expect(book.join("r", link: 2, members: 3).snapshot.members == 5)
        #expect(book.join("r", link: 1, members: 1).snapshot.members == 6)
        #expect(book.links("r") == [1, 2])
    }

    @Test func leaveDecrements() {
        var book = makeBook()
        _ = book.join("r", link: 1, members: 3)
        _ = book.join("r", link: 2, members: 3)
        book.leave(room: "r", link: 1, members: 2)
        #expect(book.members("r") == 4)
        #expect(book.links("r") == [1, 2])
        book.leave(room: "r", link: 1, members: 1)
        #expect(book.members("r") == 3)
        #expect(book.links("r") == [2])
        // Leaving more than were counted removes the link, never goes negative.
        book.leave(room: "r", link: 2, members: 10)
        #expect(book.members("r") == 0)
        #expect(book.links("r") == [])
        #expect(book.join("r", link: 3, members: 1).snapshot.members == 1)
    }

    @Test func leaveOfUnknownRoomOrLinkChangesNothing() {
        var book = makeBook()
        _ = book.join("r", link: 1, members: 2)
        book.leave(room: "nowhere", link: 1, members: 1)
        book.leave(room: "r", link: 9, members: 1)
        #expect(book.roomCount == 1)
        #expect(book.members("r") == 2)
        #expect(book.links("r") == [1])
    }

    @Test func dropLinkRemovesItsCountsEverywhere() {
        var book = makeBook()
        _ = book.join("a", link: 1, members: 2)
        _ = book.join("a", link: 2, members: 1)
        _ = book.join("b", link: 1, members: 1)
        _ = book.join("c", link: 2, members: 4)
        book.dropLink(1)
        #expect(book.members("a") == 1)
        #expect(book.links("a") == [2])
        #expect(book.members("b") == 0)
        #expect(book.links("b") == [])
        #expect(book.members("c") == 4)
        #expect(book.roomCount == 3)
        book.dropLink(99)
        #expect(book.members("a") == 1)
        #expect(book.members("c") == 4)
    }

    @Test func interestedLinks() {
        var book = makeBook()
        #expect(book.interestedLinks(in: "r") == nil)
        _ = book.publish(room: "r", from: "u", text: "t", nowMs: 0)
        #expect(book.links("r") == [])
        _ = book.join("r", link: 4, members: 1)
        _ = book.join("r", link: 7, members: 1)
        #expect(book.links("r") == [4, 7])
        #expect(book.interestedLinks(in: "other") == nil)
    }
}

@Suite struct RoomBookFetchTests {
    @Test func newestPageOldestFirst() {
        var book = makeBook()
        book.fill("r", count: 10)
        let page = book.fetch(room: "r", before: nil, limit: 3, nowMs: 10)
        #expect(page.messages.map(\.seq) == [8, 9, 10])
        #expect(page.more)
        let all = book.fetch(room: "r", before: nil, limit: 10, nowMs: 10)
        #expect(all.messages.map(\.seq) == Array(1...10))
        #expect(!all.more)
        #expect(book.fetch(room: "r", before: nil, limit: 200, nowMs: 10).messages.count == 10)
    }

    @Test func beforePagesBackwards() {
        var book = makeBook()
        book.fill("r", count: 10)
        func page(_ seq: Int, _ limit: Int) -> ([Int], Bool) {
            let result = book.fetch(room: "r", before: HistoryPosition(epoch: "e1", seq: seq), limit: limit, nowMs: 10)
            return (result.messages.map(\.seq), result.more)
        }
        #expect(page(8, 3) == ([5, 6, 7], true))
        #expect(page(5, 3) == ([2, 3, 4], true))
        #expect(page(4, 3) == ([1, 2, 3], false))
        #expect(page(3, 5) == ([1, 2], false))
        #expect(page(1, 5) == ([], false))
        #expect(page(0, 5) == ([], false))
        #expect(page(100, 3) == ([8, 9, 10], true))
    }

    @Test func pagingWalksTheWholeHistoryOnce() {
        var book = makeBook()
        book.fill("r", count: 23)
        var seen: [Int] = []
        var before: HistoryPosition?
        while true {
            let page = book.fetch(room: "r", before: before, limit: 5, nowMs: 100)
            seen = page.messages.map(\.seq) + seen
            guard page.more, let first = page.messages.first else { break }
            before = HistoryPosition(epoch: first.epoch, seq: first.seq)
        }
        #expect(seen == Array(1...23))
    }

    @Test func otherEpochAndUnknownRoomAreEmpty() {
        var book = makeBook()
        book.fill("r", count: 5)
        let other = book.fetch(room: "r", before: HistoryPosition(epoch: "old", seq: 3), limit: 10, nowMs: 10)
        #expect(other.messages.isEmpty)
        #expect(!other.more)
        let unknown = book.fetch(room: "nowhere", before: nil, limit: 10, nowMs: 10)
        #expect(unknown.messages.isEmpty)
        #expect(!unknown.more)
        #expect(book.roomCount == 1)
    }

    @Test func moreCountsOnlyWhatIsHeld() {
        var book = makeBook(messages: 3)
        book.fill("r", count: 10)
        let page = book.fetch(room: "r", before: nil, limit: 3, nowMs: 10)
        #expect(page.messages.map(\.seq) == [8, 9, 10])
        #expect(!page.more)
    }

    @Test func fetchHonoursTheMaximumAge() {
        var book = makeBook(maxAgeMs: 1_000)
        _ = book.publish(room: "r", from: "u", text: "old", nowMs: 0)
        _ = book.publish(room: "r", from: "u", text: "new", nowMs: 900)
        let page = book.fetch(room: "r", before: nil, limit: 10, nowMs: 1_500)
        #expect(page.messages.map(\.text) == ["new"])
        #expect(!page.more)
    }
}

@Suite struct RoomBookSweepTests {
    @Test func sweepDropsOnlyIdleExpiredRooms() {
        var book = makeBook(maxAgeMs: 1_000)
        _ = book.join("busy", link: 1, members: 1, nowMs: 0)
        _ = book.publish(room: "busy", from: "u", text: "t", nowMs: 0)
        _ = book.publish(room: "fresh", from: "u", text: "t", nowMs: 4_500)
        _ = book.publish(room: "stale", from: "u", text: "t", nowMs: 0)
        _ = book.join("empty", link: 2, members: 1, nowMs: 0)
        book.leave(room: "empty", link: 2, members: 1)
        _ = book.join("orphan", link: 3, members: 1, nowMs: 4_800)
        _ = book.publish(room: "orphan", from: "u", text: "t", nowMs: 4_800)
        book.dropLink(3)
        #expect(book.roomCount == 5)

        book.sweep(nowMs: 5_000)
        #expect(book.roomCount == 3)
        #expect(Set(book.rooms.keys) == ["busy", "fresh", "orphan"])
        // The busy room keeps its sequence even though its history expired.
        #expect(book.join("busy", link: 1, members: 0, nowMs: 5_000).snapshot.seq == 1)

        book.sweep(nowMs: 100_000)
        #expect(Set(book.rooms.keys) == ["busy"])
    }

    @Test func aSweptRoomStartsANewSequence() {
        var book = makeBook(maxAgeMs: 1_000)
        book.fill("r", count: 3)
        book.sweep(nowMs: 10_000)
        #expect(book.roomCount == 0)
        let again = book.publish(room: "r", from: "u", text: "t", nowMs: 10_000)
        #expect(again.seq == 1)
        #expect(again.epoch == "e2")
        // A client resuming from before the sweep is told the epoch changed.
        #expect(book.join("r", since: 3, epoch: "e1", nowMs: 10_000).gap == Gap(from: 0, to: 0, epoch: "e2"))
    }

    @Test func sweepTrimsHistoryOfKeptRooms() {
        var book = makeBook(maxAgeMs: 1_000)
        _ = book.join("r", link: 1, members: 1, nowMs: 0)
        _ = book.publish(room: "r", from: "u", text: "t", nowMs: 0)
        _ = book.publish(room: "r", from: "u", text: "t", nowMs: 900)
        book.sweep(nowMs: 1_500)
        #expect(book.rooms["r"]?.history.map(\.seq) == [2])
    }
}
