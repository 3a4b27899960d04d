import ChatArchive
import ChatProtocol
import Foundation
import GRDB
import Testing

private func temporaryPath() -> String {
    NSTemporaryDirectory() + "chatgw-archive-\(UUID().uuidString).sqlite"
}

private func message(_ room: String, _ epoch: String, _ seq: Int, ts: Int) -> RoomMessage {
    RoomMessage(room: room, seq: seq, epoch: epoch, from: "u", text: "m\(seq)", ts: ts)
}

@Suite struct SQLiteArchiveTests {
    @Test func insertIsIdempotentAndPagesInTimeOrderAcrossEpochs() async throws {
        let archive = try SQLiteArchive(path: temporaryPath(), readOnly: false)
        try await archive.prepare()
        let old = (1...5).map { message("r", "e1", $0, ts: 1000 + $0) }
        let new = (1...5).map { message("r", "e2", $0, ts: 2000 + $0) }
        try await archive.insert(old + new)
        try await archive.insert(old)  // a repeated write stores nothing twice
        let newest = try await archive.page(room: "r", before: nil, limit: 4)
        #expect(newest.messages.map(\.seq) == [2, 3, 4, 5])
        #expect(newest.messages.allSatisfy { $0.epoch == "e2" })
        #expect(newest.more)
        let older = try await archive.page(room: "r", before: HistoryPosition(epoch: "e2", seq: 2), limit: 4)
        #expect(older.messages.map { "\($0.epoch):\($0.seq)" } == ["e1:3", "e1:4", "e1:5", "e2:1"])
        let oldest = try await archive.page(room: "r", before: HistoryPosition(epoch: "e1", seq: 3), limit: 4)
        #expect(oldest.messages.map(\.seq) == [1, 2])
        #expect(!oldest.more)
    }

    @Test func textRoundTripsExactlyWithNulAndEveryPlane() async throws {
        let archive = try SQLiteArchive(path: temporaryPath(), readOnly: false)
        try await archive.prepare()
        let text = "quote \" nul \u{0} after nul, emoji 😀 rtl \u{202E} é"
        var sent = message("r", "e1", 1, ts: 1)
        sent.text = text
        try await archive.insert([sent])
        #expect(try await archive.range(room: "r", epoch: "e1", from: 1, to: 1).map(\.text) == [text])
        #expect(try await archive.page(room: "r", before: nil, limit: 1).messages.map(\.text) == [text])
    }

    @Test func aWriteRefusedForItsDataSaysSoAndOneNotTakenNowDoesNot() async throws {
        let path = temporaryPath()
        let archive = try SQLiteArchive(path: path, readOnly: false, busyTimeout: 0.2)
        try await archive.prepare()
        var poison = message("r", "e1", 1, ts: 1)
        poison.text = "poison"
        var other = Configuration()
        other.allowsUnsafeTransactions = true
        let operatorsConnection = try DatabaseQueue(path: path, configuration: other)
        try await operatorsConnection.write { db in
            try db.execute(sql: """
                CREATE TRIGGER no_poison BEFORE INSERT ON chat_messages WHEN NEW.body = 'poison'
                BEGIN SELECT RAISE(ABORT, 'no poison'); END
                """)
        }
        let refused = await #expect(throws: ArchiveError.self) { try await archive.insert([poison]) }
        #expect(refused?.refusesTheData == true)
        // Another connection holds the write lock past the busy timeout: not about the data.
        try operatorsConnection.inDatabase { db in try db.execute(sql: "BEGIN IMMEDIATE") }
        let locked = await #expect(throws: ArchiveError.self) { try await archive.insert([message("r", "e1", 2, ts: 2)]) }
        #expect(locked?.refusesTheData == false)
        try operatorsConnection.inDatabase { db in try db.execute(sql: "COMMIT") }
        try await archive.insert([message("r", "e1", 2, ts: 2)])
        #expect(try await archive.range(room: "r", epoch: "e1", from: 1, to: 2).map(\.seq) == [2])
    }

    @Test func aCheckConstraintRefusesTheWriteInsteadOfSkippingTheRow() async throws {
        let path = temporaryPath()
        // An operator's table, made before the archive's own CREATE TABLE IF NOT EXISTS.
        let operatorsConnection = try DatabaseQueue(path: path)
        try await operatorsConnection.write { db in
            try db.execute(sql: """
                CREATE TABLE chat_messages (
                    room TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
                    sender TEXT NOT NULL, body TEXT NOT NULL CHECK (body <> 'poison'), ts INTEGER NOT NULL,
                    PRIMARY KEY (room, epoch, seq)) WITHOUT ROWID
                """)
        }
        try operatorsConnection.close()
        let archive = try SQLiteArchive(path: path, readOnly: false)
        try await archive.prepare()
        var poison = message("r", "e1", 1, ts: 1)
        poison.text = "poison"
        let refused = await #expect(throws: ArchiveError.self) { try await archive.insert([poison]) }
        #expect(refused?.refusesTheData == true)
        try await archive.insert([message("r", "e1", 2, ts: 2)])
        try await archive.insert([message("r", "e1", 2, ts: 2)])  // stored already: skipped, no error
        #expect(try await archive.range(room: "r", epoch: "e1", from: 1, to: 2).map(\.seq) == [2])
    }

    @Test func tipsAreTheNewestEpochsHighestSeq() async throws {
        let archive = try SQLiteArchive(path: temporaryPath(), readOnly: false)
        try await archive.prepare()
        try await archive.insert((1...3).map { message("a", "e1", $0, ts: $0) } + (1...2).map { message("a", "e2", $0, ts: 100 + $0) }
            + [message("b", "x", 7, ts: 5)])
        let tips = try await archive.tips().sorted { $0.room < $1.room }
        #expect(tips == [ArchivedTip(room: "a", epoch: "e2", seq: 2), ArchivedTip(room: "b", epoch: "x", seq: 7)])
    }

    @Test func rangeAndRetention() async throws {
        let archive = try SQLiteArchive(path: temporaryPath(), readOnly: false)
        try await archive.prepare()
        try await archive.insert((1...10).map { message("r", "e", $0, ts: $0 * 1000) })
        #expect(try await archive.range(room: "r", epoch: "e", from: 3, to: 5).map(\.seq) == [3, 4, 5])
        _ = try await archive.applyRetention(nowMs: 10_000, maxAgeMs: 6_500, maxPerRoom: 0)
        #expect(try await archive.page(room: "r", before: nil, limit: 100).messages.map(\.seq) == [4, 5, 6, 7, 8, 9, 10])
        _ = try await archive.applyRetention(nowMs: 10_000, maxAgeMs: 0, maxPerRoom: 3)
        #expect(try await archive.page(room: "r", before: nil, limit: 100).messages.map(\.seq) == [8, 9, 10])
    }

    @Test func aCorruptFileIsRefusedWithOneLine() throws {
        let path = temporaryPath()
        try Data(repeating: 0x42, count: 8192).write(to: URL(fileURLWithPath: path))
        #expect(throws: ArchiveError.self) { try SQLiteArchive.check(path: path) }
    }
}
