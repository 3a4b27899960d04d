import ChatProtocol
import Foundation
import GRDB

/// The archive in a SQLite file (WAL mode: the archiver writes while workers read).
public final class SQLiteArchive: ArchiveStore {
    private let pool: DatabasePool

    /// Opens (and, unless read-only, creates) the file. Throws with a one-line reason.
    /// `busyTimeout`: how long a write waits for another connection's lock.
    public init(path: String, readOnly: Bool, busyTimeout: Double = 5) throws {
        var configuration = Configuration()
        configuration.readonly = readOnly
        configuration.busyMode = .timeout(busyTimeout)
        do {
            if !readOnly {
                let directory = (path as NSString).deletingLastPathComponent
                if !directory.isEmpty { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
            }
            pool = try DatabasePool(path: path, configuration: configuration)
        } catch {
            throw ArchiveError("cannot open the archive \(path): \(Self.reason(error))")
        }
    }

    /// Checks the file's integrity, then creates the schema, synchronously (the master's
    /// start-up check: a corrupt or unwritable file stops start-up with one line). A
    /// damaged file is only read, never changed.
    public static func check(path: String) throws {
        do {
            let directory = (path as NSString).deletingLastPathComponent
            if !directory.isEmpty { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
            // A plain queue: opening a pool would switch the file to WAL (a write) first.
            let queue = try DatabaseQueue(path: path)
            let verdict = try queue.read { db in try String.fetchAll(db, sql: "PRAGMA quick_check") }
            guard verdict == ["ok"] else {
                let first = verdict.first.map { $0.split(separator: "\n").joined(separator: " ") } ?? "no answer"
                let more = verdict.count > 1 ? " (and \(verdict.count - 1) more problems)" : ""
                throw ArchiveError("integrity check failed: \(first)\(more)")
            }
            try queue.write { db in try createSchema(db) }
            try queue.close()
        } catch let error as ArchiveError {
            throw ArchiveError("the archive \(path) is not usable: \(error.description)")
        } catch {
            throw ArchiveError("the archive \(path) is not usable: \(reason(error))")
        }
    }

    public func prepare() async throws {
        try await pool.write { db in try Self.createSchema(db) }
    }

    private static func createSchema(_ db: Database) throws {
        try db.execute(sql: """
            CREATE TABLE IF NOT EXISTS chat_messages (
                room TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
                sender TEXT NOT NULL, body TEXT NOT NULL, ts INTEGER NOT NULL,
                PRIMARY KEY (room, epoch, seq)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS chat_messages_time ON chat_messages (room, ts, epoch, seq);
            """)
    }

    public func insert(_ messages: [RoomMessage]) async throws {
        guard !messages.isEmpty else { return }
        do {
            try await write(messages)
        } catch let error as DatabaseError {
            throw ArchiveError("SQLite: \(Self.reason(error))", refusesTheData: Self.refusesTheData(error))
        }
    }

    /// A constraint (say, a CHECK added by an operator), a value too big for the file, a
    /// type mismatch. A full disk, a lock held past the busy timeout, an I/O error: none of them.
    static func refusesTheData(_ error: DatabaseError) -> Bool {
        [ResultCode.SQLITE_CONSTRAINT, .SQLITE_TOOBIG, .SQLITE_MISMATCH].contains(error.resultCode.primaryResultCode)
    }

    private func write(_ messages: [RoomMessage]) async throws {
        try await pool.write { db in
            // The text goes in as bytes, stored as TEXT: GRDB binds (and reads) a String as a
            // C string, which ends at the first U+0000, a valid character in a chat message.
            // A message stored already is skipped; any other constraint (OR IGNORE would skip
            // those rows too, silently) refuses the write.
            let statement = try db.cachedStatement(sql: """
                INSERT INTO chat_messages VALUES (?, ?, ?, ?, CAST(? AS TEXT), ?) ON CONFLICT (room, epoch, seq) DO NOTHING
                """)
            for message in messages {
                try statement.execute(arguments: [message.room, message.epoch, message.seq, message.from, Data(message.text.utf8), message.ts])
            }
        }
    }

    public func tips() async throws -> [ArchivedTip] {
        try await pool.read { db in
            // The newest epoch of each room (by time), and its highest seq.
            try Row.fetchAll(db, sql: """
                SELECT room, epoch, MAX(seq) AS seq FROM chat_messages m
                WHERE epoch = (SELECT epoch FROM chat_messages WHERE room = m.room ORDER BY ts DESC, seq DESC LIMIT 1)
                GROUP BY room, epoch
                """).map { ArchivedTip(room: $0["room"], epoch: $0["epoch"], seq: $0["seq"]) }
        }
    }

    public func page(room: String, before: HistoryPosition?, limit: Int) async throws -> (messages: [RoomMessage], more: Bool) {
        try await pool.read { db in
            var rows: [Row]
            if let before {
                let anchor = try Int.fetchOne(db, sql: "SELECT ts FROM chat_messages WHERE room = ? AND epoch = ? AND seq = ?",
                                              arguments: [room, before.epoch, before.seq])
                    ?? Int.fetchOne(db, sql: "SELECT MIN(ts) FROM chat_messages WHERE room = ? AND epoch = ? AND seq > ?",
                                    arguments: [room, before.epoch, before.seq])
                    ?? Int.max
                rows = try Row.fetchAll(db, sql: """
                    SELECT \(Self.columns) FROM chat_messages WHERE room = ?
                      AND (ts < ? OR (ts = ? AND (epoch < ? OR (epoch = ? AND seq < ?))))
                    ORDER BY ts DESC, epoch DESC, seq DESC LIMIT ?
                    """, arguments: [room, anchor, anchor, before.epoch, before.epoch, before.seq, limit + 1])
            } else {
                rows = try Row.fetchAll(db, sql: "SELECT \(Self.columns) FROM chat_messages WHERE room = ? ORDER BY ts DESC, epoch DESC, seq DESC LIMIT ?",
                                        arguments: [room, limit + 1])
            }
            let more = rows.count > limit
            rows = Array(rows.prefix(limit))
            return (rows.reversed().map(Self.message), more)
        }
    }

    public func range(room: String, epoch: String, from: Int, to: Int) async throws -> [RoomMessage] {
        try await pool.read { db in
            try Row.fetchAll(db, sql: "SELECT \(Self.columns) FROM chat_messages WHERE room = ? AND epoch = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                             arguments: [room, epoch, from, to]).map(Self.message)
        }
    }

    public func applyRetention(nowMs: Int, maxAgeMs: Int, maxPerRoom: Int) async throws -> Int {
        try await pool.write { db in
            var removed = 0
            if maxAgeMs > 0 {
                try db.execute(sql: "DELETE FROM chat_messages WHERE ts < ?", arguments: [nowMs - maxAgeMs])
                removed += db.changesCount
            }
            if maxPerRoom > 0 {
                try db.execute(sql: """
                    DELETE FROM chat_messages WHERE (room, epoch, seq) IN (
                      SELECT room, epoch, seq FROM (
                        SELECT room, epoch, seq, ROW_NUMBER() OVER (PARTITION BY room ORDER BY ts DESC, epoch DESC, seq DESC) AS n
                        FROM chat_messages) WHERE n > ?)
                    """, arguments: [maxPerRoom])
                removed += db.changesCount
            }
            return removed
        }
    }

    public func close() async {
        try? pool.close()
    }

    /// Every column, the text read back as bytes (see `insert`).
    private static let columns = "room, epoch, seq, sender, CAST(body AS BLOB) AS body, ts"

    private static func message(_ row: Row) -> RoomMessage {
        let body: Data = row["body"]
        return RoomMessage(room: row["room"], seq: row["seq"], epoch: row["epoch"], from: row["sender"], text: String(decoding: body, as: UTF8.self), ts: row["ts"])
    }

    /// One line, without Foundation's user-info dump.
    private static func reason(_ error: Error) -> String {
        if let error = error as? DatabaseError { return error.message ?? "\(error.resultCode)" }
        let text = (error as NSError).localizedDescription
        return text.split(separator: "\n").joined(separator: " ")
    }
}
