import ChatBus
import ChatProtocol
import Testing
@testable import ChatWorker

private func message(_ seq: Int, _ epoch: String = "e2") -> RoomMessage {
    RoomMessage(room: "r", seq: seq, epoch: epoch, from: "u", text: "t\(seq)", ts: seq)
}

private func answer(seq: Int, epoch: String = "e2", replay: ClosedRange<Int>?, gap: Gap?) -> JoinResult {
    JoinResult(room: RoomSnapshot(name: "r", epoch: epoch, seq: seq, members: 3),
               replay: replay.map { $0.map { message($0, epoch) } } ?? [], gap: gap)
}

/// The frames as short words: `joined e2:10`, `e2:5`, `gap e2 3-4`.
private func words(_ frames: [ServerMessage]) -> [String] {
    frames.map { frame in
        switch frame {
        case .joined(_, let seq, let epoch, _, _): "joined \(epoch):\(seq)"
        case .message(let m): "\(m.epoch):\(m.seq)"
        case .gap(_, let from, let to, let epoch): "gap \(epoch) \(from)-\(to)"
        default: "other"
        }
    }
}

@Suite struct JoinReplyTests {
    @Test func aJoinTheHistoryAnswersNeedsNoArchive() {
        let plain = answer(seq: 10, replay: 8...10, gap: nil)
        #expect(JoinReply.reads(for: plain, since: 7, epoch: "e2") == nil)
        #expect(words(JoinReply(room: "r", answer: plain).messages()) == ["joined e2:10", "e2:8", "e2:9", "e2:10"])
    }

    @Test func aFreshJoinWithAGapIsNotAResume() {
        let fresh = answer(seq: 10, replay: 9...10, gap: Gap(from: 3, to: 8, epoch: "e2"))
        #expect(JoinReply.reads(for: fresh, since: nil, epoch: nil) == nil)
    }

    @Test func theLostPartComesFromTheArchiveBeforeTheReplay() {
        let resume = answer(seq: 10, replay: 9...10, gap: Gap(from: 4, to: 8, epoch: "e2"))
        #expect(JoinReply.reads(for: resume, since: 3, epoch: "e2")
                == .init(olderEpoch: nil, lost: .init(epoch: "e2", seqs: 4...8)))
        let reply = JoinReply(room: "r", answer: resume).messages(archived: (4...8).map { message($0) })
        #expect(words(reply) == ["joined e2:10", "e2:4", "e2:5", "e2:6", "e2:7", "e2:8", "e2:9", "e2:10"])
    }

    @Test func whatTheArchiveLacksTooIsAGapWhereverItIs() {
        let resume = answer(seq: 10, replay: 9...10, gap: Gap(from: 2, to: 8, epoch: "e2"))
        let archived = [4, 5, 7].map { message($0) }
        #expect(words(JoinReply(room: "r", answer: resume).messages(archived: archived))
                == ["joined e2:10", "gap e2 2-3", "e2:4", "e2:5", "gap e2 6-6", "e2:7", "gap e2 8-8", "e2:9", "e2:10"])
        #expect(words(JoinReply(room: "r", answer: resume).messages(archived: []))
                == ["joined e2:10", "gap e2 2-8", "e2:9", "e2:10"])
    }

    @Test func archivedMessagesOutsideTheGapAreIgnored() {
        let resume = answer(seq: 10, replay: 9...10, gap: Gap(from: 7, to: 8, epoch: "e2"))
        let archived = [message(6), message(7), message(7, "e1"), message(8), message(9)]
        #expect(words(JoinReply(room: "r", answer: resume).messages(archived: archived))
                == ["joined e2:10", "e2:7", "e2:8", "e2:9", "e2:10"])
    }

    @Test func aResumeFromAnOlderEpochGetsItsTailThenTheNewEpoch() {
        // The relay restarted: epoch e2 from 1, all of it still held.
        let resume = answer(seq: 3, replay: 1...3, gap: Gap(from: 0, to: 0, epoch: "e2"))
        let reads = JoinReply.reads(for: resume, since: 40, epoch: "e1")
        #expect(reads == .init(olderEpoch: .init(epoch: "e1", after: 40), lost: nil))
        let tail = [41, 42].map { message($0, "e1") }
        #expect(words(JoinReply(room: "r", answer: resume).messages(olderEpochTail: tail))
                == ["joined e2:3", "e1:41", "e1:42", "gap e2 0-0", "e2:1", "e2:2", "e2:3"])
    }

    @Test func anOlderEpochAndALostStartOfTheNewOne() {
        let resume = answer(seq: 30, replay: 21...30, gap: Gap(from: 1, to: 20, epoch: "e2"))
        #expect(JoinReply.reads(for: resume, since: 40, epoch: "e1")
                == .init(olderEpoch: .init(epoch: "e1", after: 40), lost: .init(epoch: "e2", seqs: 1...20)))
        let reply = JoinReply(room: "r", answer: resume).messages(olderEpochTail: [message(41, "e1")], archived: (11...20).map { message($0) })
        #expect(Array(words(reply).prefix(4)) == ["joined e2:30", "e1:41", "gap e2 1-10", "e2:11"])
        #expect(words(reply).count == 1 + 1 + 1 + 10 + 10)
    }
}
