import ChatProtocol
import Testing
@testable import ChatWorker

@Suite struct SessionRoomsTests {
    /// A room asked of the bus; returns its attempt.
    private func asked(_ rooms: inout SessionRooms, _ room: String = "r") -> UInt32 {
        guard case .askBus(let attempt) = rooms.join(room, allowed: true, roomLimit: 10) else {
            Issue.record("join of \(room) did not ask the bus")
            return 0
        }
        return attempt
    }

    @Test func aCompleteAnswerJoinsAndOpensSending() {
        var rooms = SessionRooms()
        let attempt = asked(&rooms)
        #expect(!rooms.canSend(to: "r"), "a send before joined")
        do {
            let step = rooms.busWaitEnded("r", attempt: attempt, available: true)
            #expect(step == .askBus)
        }
        do {
            let step = rooms.busAnswered("r", attempt: attempt, succeeded: true, needsArchive: false, mayWaitMore: true)
            #expect(step == .joined)
        }
        #expect(rooms.canSend(to: "r"))
        do {
            let step = rooms.join("r", allowed: true, roomLimit: 10)
            #expect(step == .joinedAlready)
        }
    }

    @Test func refusalsChangeNothing() {
        var rooms = SessionRooms()
        _ = asked(&rooms, "a")
        do {
            let step = rooms.join("a", allowed: true, roomLimit: 10)
            #expect(step == .refuse(.badJSON, "already joining this room"))
        }
        do {
            let step = rooms.join("b", allowed: false, roomLimit: 10)
            #expect(step == .refuse(.forbidden, "your token does not allow this room"))
        }
        do {
            let step = rooms.join("b", allowed: true, roomLimit: 1)
            #expect(step == .refuse(.tooManyRooms, "at most 1 rooms per connection"))
        }
        #expect(rooms.count == 1)
    }

    @Test func aReplayFromTheArchiveJoinsOnlyOnceRead() {
        var rooms = SessionRooms()
        let attempt = asked(&rooms)
        do {
            let step = rooms.busAnswered("r", attempt: attempt, succeeded: true, needsArchive: true, mayWaitMore: true)
            #expect(step == .fill)
        }
        do {
            let step = rooms.join("r", allowed: true, roomLimit: 10)
            #expect(step == .refuse(.badJSON, "already joining this room"))
        }
        #expect(!rooms.canSend(to: "r"), "a send before the replay is out")
        do {
            let step = rooms.filled("r", attempt: attempt)
            #expect(step)
        }
        #expect(rooms.canSend(to: "r"))
    }

    @Test func aBusThatStaysAwayEndsTheJoin() {
        var rooms = SessionRooms()
        var attempt = asked(&rooms)
        do {
            let step = rooms.busWaitEnded("r", attempt: attempt, available: false)
            #expect(step == .unavailable)
        }
        #expect(rooms["r"] == nil)
        // A link that drops while answering: asked again while there is time, then refused.
        attempt = asked(&rooms)
        do {
            let step = rooms.busAnswered("r", attempt: attempt, succeeded: false, needsArchive: false, mayWaitMore: true)
            #expect(step == .askAgain)
        }
        #expect(rooms["r"] == .joining(attempt: attempt))
        do {
            let step = rooms.busAnswered("r", attempt: attempt, succeeded: false, needsArchive: false, mayWaitMore: false)
            #expect(step == .unavailable)
        }
        #expect(rooms["r"] == nil)
    }

    @Test func leavingWhileJoiningUndoesTheAnswerThatComesLater() {
        var rooms = SessionRooms()
        let first = asked(&rooms)
        do {
            let step = rooms.leave("r")
            #expect(step == .left(quit: false), "the room table never had it")
        }
        do {
            let step = rooms.busWaitEnded("r", attempt: first, available: true)
            #expect(step == .drop)
        }
        do {
            let step = rooms.busAnswered("r", attempt: first, succeeded: true, needsArchive: false, mayWaitMore: true)
            #expect(step == .undo)
        }
        do {
            let step = rooms.busAnswered("r", attempt: first, succeeded: false, needsArchive: false, mayWaitMore: true)
            #expect(step == .drop)
        }
        // Left and joined again while the first answer was on its way: only the second counts.
        let again = asked(&rooms)
        do {
            let step = rooms.busAnswered("r", attempt: first, succeeded: true, needsArchive: false, mayWaitMore: true)
            #expect(step == .undo)
        }
        #expect(rooms["r"] == .joining(attempt: again))
        do {
            let step = rooms.busAnswered("r", attempt: again, succeeded: true, needsArchive: false, mayWaitMore: true)
            #expect(step == .joined)
        }
    }

    @Test func leavingWhileFillingQuitsAndTheReadIsDropped() {
        var rooms = SessionRooms()
        let attempt = asked(&rooms)
        _ = rooms.busAnswered("r", attempt: attempt, succeeded: true, needsArchive: true, mayWaitMore: true)
        do {
            let step = rooms.leave("r")
            #expect(step == .left(quit: true))
        }
        do {
            let step = rooms.filled("r", attempt: attempt)
            #expect(!step)
        }
        do {
            let step = rooms.leave("r")
            #expect(step == .notJoined)
        }
    }

    @Test func aDepartureQuitsEveryCountedRoom() {
        var rooms = SessionRooms()
        let a = asked(&rooms, "a"), b = asked(&rooms, "b")
        _ = asked(&rooms, "c")
        _ = rooms.busAnswered("a", attempt: a, succeeded: true, needsArchive: false, mayWaitMore: true)
        _ = rooms.busAnswered("b", attempt: b, succeeded: true, needsArchive: true, mayWaitMore: true)
        do {
            let step = rooms.departAll()
            #expect(step == ["a", "b"], "c is undone when its answer comes")
        }
        #expect(rooms.count == 0)
        do {
            let step = rooms.busAnswered("c", attempt: a &+ 2, succeeded: true, needsArchive: false, mayWaitMore: true)
            #expect(step == .undo)
        }
    }
}
