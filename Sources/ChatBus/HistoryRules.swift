import ChatProtocol

/// What a join replays and what a scroll-back returns, given a room's held history.
/// Both buses (relay and Redis) hold a bounded, seq-ordered history per room and answer
/// from it with these same rules, so clients see one behaviour whatever the bus.
public enum HistoryRules {
    /// The messages to replay on a join and the gap to report first.
    ///
    /// - `history`: also replay the last N messages.
    /// - `since` with the room's epoch (or no epoch): every held message after `since`; a
    ///   `gap {since+1, firstHeld-1}` when the history no longer reaches back that far.
    /// - `since` with another epoch: the current epoch from its start as far as held, and
    ///   a gap in the current epoch (`{0,0}` when nothing of it is missing).
    @inlinable
    public static func replay<Held: RandomAccessCollection<RoomMessage>>(
        held: Held, epoch current: String, seq: Int, since: Int?, epoch: String?, history: Int
    ) -> (replay: [RoomMessage], gap: Gap?) {
        let firstHeld = held.first?.seq ?? seq + 1
        var replayFrom = seq - history + 1
        var gap: Gap?
        if let since {
            if let epoch, epoch != current {
                replayFrom = 1
                gap = firstHeld > 1 ? Gap(from: 1, to: firstHeld - 1, epoch: current) : Gap(from: 0, to: 0, epoch: current)
            } else {
                replayFrom = min(replayFrom, since + 1)
                if since + 1 < firstHeld {
                    gap = Gap(from: since + 1, to: firstHeld - 1, epoch: current)
                }
            }
        }
        return (held.filter { $0.seq >= replayFrom }, gap)
    }

    /// Up to `limit` held messages before `before` (default: the newest), oldest first,
    /// and whether older ones are held. Another epoch's messages are not held any more.
    @inlinable
    public static func page<Held: RandomAccessCollection<RoomMessage>>(
        held: Held, epoch current: String, before: HistoryPosition?, limit: Int
    ) -> (messages: [RoomMessage], more: Bool) {
        var end = held.endIndex
        if let before {
            guard before.epoch == current else { return ([], false) }
            end = held.firstIndex { $0.seq >= before.seq } ?? held.endIndex
        }
        let candidates = held[held.startIndex..<end]
        let page = candidates.suffix(limit)
        return (Array(page), page.count < candidates.count)
    }
}

/// A new random epoch: 16 hex digits.
public enum Epoch {
    public static func random() -> String {
        let text = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }
}
