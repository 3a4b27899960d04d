import ChatArchive
import ChatProtocol

extension ArchiveStore {
    /// What a resume needs from the archive (`JoinReply.reads`). The archiver writes in
    /// batches, so the newest of the lost messages may not be written yet: what is missing
    /// at the end is read again a batch (`batchWait`) later, up to `rereads` times, before
    /// the reply reports it as a gap.
    func read(_ reads: JoinReply.ArchiveReads, room: String, batchWait: Duration, rereads: Int = 3) async throws
        -> (olderEpochTail: [RoomMessage], lost: [RoomMessage])
    {
        var tail: [RoomMessage] = []
        if let older = reads.olderEpoch {
            tail = try await range(room: room, epoch: older.epoch, from: older.after + 1, to: Int(Int32.max))
        }
        guard let lost = reads.lost else { return (tail, []) }
        var found = try await range(room: room, epoch: lost.epoch, from: lost.seqs.lowerBound, to: lost.seqs.upperBound)
        for _ in 0..<rereads {
            let next = (found.last?.seq ?? lost.seqs.lowerBound - 1) + 1
            guard next <= lost.seqs.upperBound else { break }
            try await Task.sleep(for: batchWait)
            found += try await range(room: room, epoch: lost.epoch, from: next, to: lost.seqs.upperBound)
        }
        return (tail, found)
    }
}
