import ChatProtocol

/// Scroll-back from two sources: the archive's page and the bus's newest messages (which
/// the archiver may not have written yet). Pure.
enum HistoryMerge {
    typealias Page = (messages: [RoomMessage], more: Bool)

    /// The newest `limit` messages of both, without duplicates, in time order (then
    /// epoch and seq); nil when there is nothing true to answer.
    ///
    /// `archived` nil means the archive could not be read. The bus holds only the newest
    /// messages, so its page alone never says that nothing older exists (`more` stays true:
    /// asking on reaches the archive once it is back), and a page the bus holds nothing of
    /// cannot be told from the room's beginning: that is nil too.
    static func page(archived: Page?, recent: Page?, limit: Int) -> Page? {
        guard archived != nil || recent?.messages.isEmpty == false else { return nil }
        var seen = Set<Position>()
        let merged = ((archived?.messages ?? []) + (recent?.messages ?? []))
            .filter { seen.insert(Position(epoch: $0.epoch, seq: $0.seq)).inserted }
            .sorted { ($0.ts, $0.epoch, $0.seq) < ($1.ts, $1.epoch, $1.seq) }
        let page = Array(merged.suffix(limit))
        let olderArchived = archived?.more ?? true
        return (page, olderArchived || merged.count > limit || recent?.more == true)
    }

    private struct Position: Hashable {
        var epoch: String
        var seq: Int
    }
}
