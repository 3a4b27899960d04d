import ChatProtocol
import Foundation
import Logging
import PostgresNIO

/// The archive in PostgreSQL, which several gateways (on one Redis) share: every
/// archiver writes every message, and the primary key keeps one copy.
public final class PostgresArchive: ArchiveStore {
    private let client: PostgresClient
    private let runner: Task<Void, Never>
    /// The longest one operation may wait for PostgreSQL (`archive.postgres_timeout_ms`).
    private let timeoutMs: Int

    /// A retention delete may rightly take minutes on a large table; it is bounded too,
    /// since the writer waits for it, but not by the timeout meant for a batch.
    static let shortestRetentionTimeoutMs = 300_000

    public init(url: String, timeoutMs: Int = 10_000) throws {
        guard let components = URLComponents(string: url), let host = components.host,
              ["postgres", "postgresql"].contains(components.scheme ?? "") else {
            throw ArchiveError("archive.postgres_url is not a postgres:// URL")
        }
        let database = components.path.split(separator: "/").first.map(String.init)
        var configuration = PostgresClient.Configuration(
            host: host, port: components.port ?? 5432, username: components.user ?? "postgres",
            password: components.password, database: database, tls: .disable)
        configuration.options.maximumConnections = 4
        configuration.options.connectionIdleTimeout = .seconds(60)
        let client = PostgresClient(configuration: configuration, backgroundLogger: Logger(label: "chatgw.archive.postgres"))
        self.client = client
        self.timeoutMs = timeoutMs
        runner = Task { await client.run() }
    }

    /// `body` within the timeout: past it, "no answer" is thrown and the caller retries as
    /// after any lost connection. Without it one query that never returned stopped the
    /// archive for good, logging nothing (see `withDeadline`).
    private func bounded<T: Sendable>(_ what: String, withinMs limit: Int? = nil,
                                      _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let limit = limit ?? timeoutMs
        return try await withDeadline(.milliseconds(limit), failing: {
            ArchiveError("PostgreSQL gave no answer to the archive's \(what) within \(limit) ms")
        }, body)
    }

    public func prepare() async throws {
        try await bounded("table check") { try await self.createTable() }
    }

    private func createTable() async throws {
        try await query("""
            CREATE TABLE IF NOT EXISTS chat_messages (
                room TEXT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL,
                sender TEXT NOT NULL, body TEXT NOT NULL, ts BIGINT NOT NULL,
                PRIMARY KEY (room, epoch, seq))
            """)
        try await query("CREATE INDEX IF NOT EXISTS chat_messages_time ON chat_messages (room, ts, epoch, seq)")
    }

    public func insert(_ messages: [RoomMessage]) async throws {
        guard !messages.isEmpty else { return }
        try await bounded("write") { try await self.write(messages) }
    }

    private func write(_ messages: [RoomMessage]) async throws {
        let rooms = messages.map(\.room), epochs = messages.map(\.epoch), seqs = messages.map { Int64($0.seq) }
        let senders = messages.map(\.from), bodies = messages.map { Self.storable($0.text) }, times = messages.map { Int64($0.ts) }
        try await query("""
            INSERT INTO chat_messages (room, epoch, seq, sender, body, ts)
            SELECT * FROM UNNEST(\(rooms)::text[], \(epochs)::text[], \(seqs)::bigint[], \(senders)::text[], \(bodies)::text[], \(times)::bigint[])
            ON CONFLICT DO NOTHING
            """)
    }

    /// PostgreSQL's TEXT cannot hold U+0000, a valid character in a message: the archive keeps
    /// U+FFFD in its place. Refused, one such message failed its whole batch again and again,
    /// and the archive stopped for every room.
    static func storable(_ text: String) -> String {
        guard text.utf8.contains(0) else { return text }
        return String(String.UnicodeScalarView(text.unicodeScalars.map { $0 == "\u{0}" ? "\u{FFFD}" : $0 }))
    }

    public func tips() async throws -> [ArchivedTip] {
        try await bounded("read of each room's newest message") { try await self.readTips() }
    }

    private func readTips() async throws -> [ArchivedTip] {
        let rows = try await query("""
            SELECT DISTINCT ON (room) room, epoch, seq FROM chat_messages ORDER BY room, ts DESC, seq DESC
            """)
        var tips: [ArchivedTip] = []
        for try await (room, epoch, seq) in rows.decode((String, String, Int64).self) {
            tips.append(ArchivedTip(room: room, epoch: epoch, seq: Int(seq)))
        }
        return tips
    }

    public func page(room: String, before: HistoryPosition?, limit: Int) async throws -> (messages: [RoomMessage], more: Bool) {
        try await bounded("history read") { try await self.readPage(room: room, before: before, limit: limit) }
    }

    private func readPage(room: String, before: HistoryPosition?, limit: Int) async throws -> (messages: [RoomMessage], more: Bool) {
        let rows: PostgresRowSequence
        let fetch = limit + 1
        if let before {
            let epoch = before.epoch, seq = Int64(before.seq)
            var anchor = Int64.max
            for try await (ts,) in try await query("""
                SELECT COALESCE(
                  (SELECT ts FROM chat_messages WHERE room = \(room) AND epoch = \(epoch) AND seq = \(seq)),
                  (SELECT MIN(ts) FROM chat_messages WHERE room = \(room) AND epoch = \(epoch) AND seq > \(seq)),
                  9223372036854775807)
                """).decode((Int64,).self) { anchor = ts }
            rows = try await query("""
                SELECT room, epoch, seq, sender, body, ts FROM chat_messages WHERE room = \(room)
                  AND (ts < \(anchor) OR (ts = \(anchor) AND (epoch < \(epoch) OR (epoch = \(epoch) AND seq < \(seq)))))
                ORDER BY ts DESC, epoch DESC, seq DESC LIMIT \(fetch)
                """)
        } else {
            rows = try await query("""
                SELECT room, epoch, seq, sender, body, ts FROM chat_messages WHERE room = \(room)
                ORDER BY ts DESC, epoch DESC, seq DESC LIMIT \(fetch)
                """)
        }
        var messages = try await Self.messages(rows)
        let more = messages.count > limit
        messages = Array(messages.prefix(limit))
        return (messages.reversed(), more)
    }

    public func range(room: String, epoch: String, from: Int, to: Int) async throws -> [RoomMessage] {
        try await bounded("history read") { try await self.readRange(room: room, epoch: epoch, from: from, to: to) }
    }

    private func readRange(room: String, epoch: String, from: Int, to: Int) async throws -> [RoomMessage] {
        let low = Int64(from), high = Int64(to)
        return try await Self.messages(try await query("""
            SELECT room, epoch, seq, sender, body, ts FROM chat_messages
            WHERE room = \(room) AND epoch = \(epoch) AND seq BETWEEN \(low) AND \(high) ORDER BY seq
            """))
    }

    public func applyRetention(nowMs: Int, maxAgeMs: Int, maxPerRoom: Int) async throws -> Int {
        try await bounded("retention delete", withinMs: max(timeoutMs, Self.shortestRetentionTimeoutMs)) {
            try await self.deleteExpired(nowMs: nowMs, maxAgeMs: maxAgeMs, maxPerRoom: maxPerRoom)
        }
    }

    private func deleteExpired(nowMs: Int, maxAgeMs: Int, maxPerRoom: Int) async throws -> Int {
        if maxAgeMs > 0 {
            let cutoff = Int64(nowMs - maxAgeMs)
            try await query("DELETE FROM chat_messages WHERE ts < \(cutoff)")
        }
        if maxPerRoom > 0 {
            let keep = Int64(maxPerRoom)
            try await query("""
                DELETE FROM chat_messages m USING (
                  SELECT room, epoch, seq FROM (
                    SELECT room, epoch, seq, ROW_NUMBER() OVER (PARTITION BY room ORDER BY ts DESC, epoch DESC, seq DESC) AS n
                    FROM chat_messages) ranked WHERE n > \(keep)) old
                WHERE m.room = old.room AND m.epoch = old.epoch AND m.seq = old.seq
                """)
        }
        return 0
    }

    public func close() async {
        runner.cancel()
    }

    /// A query whose error can be logged. Printed, PostgresNIO's errors say only "Generic
    /// description to prevent accidental leakage of sensitive data" (they guard against
    /// showing them to end users); the archive's go to the operator's log, with the
    /// server's message and SQLSTATE, or what the connection met. Not the server's DETAIL,
    /// which may quote a row: someone's message.
    @discardableResult
    private func query(_ query: PostgresQuery) async throws -> PostgresRowSequence {
        do {
            return try await client.query(query)
        } catch let error as PSQLError {
            throw ArchiveError(Self.explain(error), refusesTheData: Self.refusesTheData(error))
        }
    }

    /// SQLSTATE classes about the row itself: 22 data exception, 23 integrity constraint
    /// violation, 54 program limit exceeded (an index row too large, say). A full disk
    /// (53100), a lock or a serialization failure, a dropped connection: none of them.
    static func refusesTheData(_ error: PSQLError) -> Bool {
        guard let state = error.serverInfo?[.sqlState] else { return false }
        return ["22", "23", "54"].contains(state.prefix(2))
    }

    static func explain(_ error: PSQLError) -> String {
        if let server = error.serverInfo {
            return "PostgreSQL: \(server[.message] ?? "error")" + (server[.sqlState].map { " (SQLSTATE \($0))" } ?? "")
        }
        if let underlying = error.underlying {
            return "PostgreSQL \(error.code): \(underlying)"
        }
        return "PostgreSQL \(error.code)"
    }

    private static func messages(_ rows: PostgresRowSequence) async throws -> [RoomMessage] {
        var messages: [RoomMessage] = []
        for try await (room, epoch, seq, sender, body, ts) in rows.decode((String, String, Int64, String, String, Int64).self) {
            messages.append(RoomMessage(room: room, seq: Int(seq), epoch: epoch, from: sender, text: body, ts: Int(ts)))
        }
        return messages
    }
}
