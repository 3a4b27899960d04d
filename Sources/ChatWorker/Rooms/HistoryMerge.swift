import ChatProtocol

/// Scroll-back from two sources: the archive's page and the bus's newest messages (which
/// the archiver may not have written yet). Pure.
enum HistoryMerge {
    typealias Page = (messages: [RoomMessage], more: Bool)

    /// The newest `limit` messages of both, without duplicates, in time order (then
    /// epoch and seq); nil when neither answered.
    static func page(archived: Page?, recent: Page?, limit: Int) -> Page? {
        guard archived != nil || recent != nil else { return nil }
        var seen = Set<Position>()
        let merged = ((archived?.messages ?? []) + (recent?.messages ?? []))
            .filter { seen.insert(Position(epoch: $0.epoch, seq: $0.seq)).inserted }
            .sorted { ($0.ts, $0.epoch, $0.seq) < ($1.ts, $1.epoch, $1.seq) }
        let page = Array(merged.suffix(limit))
        return (page, merged.count > limit || archived?.more == true || recent?.more == true)
    }

    private struct Position: Hashable {
        var epoch: String
        var seq: Int
    }
}
