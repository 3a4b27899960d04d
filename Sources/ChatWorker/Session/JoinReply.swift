import ChatBus
import ChatProtocol

/// What the answer to a `join` becomes on the wire, in the order docs/PROTOCOL.md gives
/// ("Joining and resuming"):
///
/// 1. `joined`;
/// 2. for a resume from an older epoch, the rest of that epoch after `since` (archive);
/// 3. the part of the current epoch the bus's history lost (the answer's gap), from the
///    archive, with a `gap` for each range the archive lacks too;
/// 4. the bus's replay.
///
/// Live messages follow; the room table keeps them back until this is written.
/// Pure: the session reads the archive (`reads`) and writes `messages`.
struct JoinReply {
    /// What a resume needs from the archive before it can be answered.
    struct ArchiveReads: Equatable {
        /// The client's older epoch and its `since`: every archived message after it.
        var olderEpoch: OlderEpoch?
        /// The seqs of the current epoch that the bus's history no longer holds.
        var lost: Lost?
    }

    struct OlderEpoch: Equatable {
        var epoch: String
        var after: Int
    }

    struct Lost: Equatable {
        var epoch: String
        var seqs: ClosedRange<Int>
    }

    var room: String
    var answer: JoinResult
    var ref: String?

    /// The archive reads a resume from `since` (in `epoch`) needs, or nil when the bus's
    /// answer is complete: no gap, or not a resume.
    static func reads(for answer: JoinResult, since: Int?, epoch: String?) -> ArchiveReads? {
        guard let gap = answer.gap, let since else { return nil }
        let older = epoch.flatMap { $0 == gap.epoch ? nil : OlderEpoch(epoch: $0, after: since) }
        let lost = gap.from > 0 && gap.from <= gap.to ? Lost(epoch: gap.epoch, seqs: gap.from...gap.to) : nil
        return ArchiveReads(olderEpoch: older, lost: lost)
    }

    /// The frames to write, given what the archive gave (`archived`: messages of the
    /// answer's gap range, oldest first; anything outside it is ignored).
    func messages(olderEpochTail: [RoomMessage] = [], archived: [RoomMessage] = []) -> [ServerMessage] {
        [joined] + following(olderEpochTail: olderEpochTail, archived: archived)
    }

    var joined: ServerMessage {
        .joined(room: room, seq: answer.room.seq, epoch: answer.room.epoch, members: answer.room.members, ref: ref)
    }

    /// What follows `joined`: the same for every member whose join asked the same (`ref`
    /// aside), given the same archive reads.
    func following(olderEpochTail: [RoomMessage] = [], archived: [RoomMessage] = []) -> [ServerMessage] {
        var out: [ServerMessage] = olderEpochTail.map { .message($0) }
        if let gap = answer.gap {
            if gap.from == 0 {
                // The epoch changed; `to` says how much of the new one is lost (0: none).
                out.append(.gap(room: room, from: 0, to: gap.to, epoch: gap.epoch))
            } else {
                var next = gap.from
                for message in archived where message.epoch == gap.epoch && message.seq >= next && message.seq <= gap.to {
                    if message.seq > next {
                        out.append(.gap(room: room, from: next, to: message.seq - 1, epoch: gap.epoch))
                    }
                    out.append(.message(message))
                    next = message.seq + 1
                }
                if next <= gap.to {
                    out.append(.gap(room: room, from: next, to: gap.to, epoch: gap.epoch))
                }
            }
        }
        out += answer.replay.map { .message($0) }
        return out
    }
}
