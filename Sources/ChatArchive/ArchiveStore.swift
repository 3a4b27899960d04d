import ChatConfig
import ChatProtocol

// The archive keeps every sequenced message, keyed by (room, epoch, seq) so that a write
// repeated after a crash, a catch-up or a second gateway's archiver stores it once:
//
//   chat_messages(room, epoch, seq, sender, body, ts)  PRIMARY KEY (room, epoch, seq)
//   index (room, ts, epoch, seq) for scroll-back in time order across epochs
//
// Scroll-back orders by (ts, epoch, seq): within an epoch that is seq order, and epochs
// follow each other in time.

/// The newest archived message of a room (what catch-up resumes after): a room's position,
/// as a client's resume point is.
public typealias ArchivedTip = StreamMark

/// Either database behind one interface. Every method may throw when the database is
/// unreachable; callers retry or fall back, never crash.
public protocol ArchiveStore: Sendable {
    /// Creates the table and index if missing.
    func prepare() async throws
    /// Stores messages; ones already stored are skipped.
    func insert(_ messages: [RoomMessage]) async throws
    /// The newest archived message of every room.
    func tips() async throws -> [ArchivedTip]
    /// Up to `limit` messages before `before` (default: the newest), oldest first, and
    /// whether older ones exist.
    func page(room: String, before: HistoryPosition?, limit: Int) async throws -> (messages: [RoomMessage], more: Bool)
    /// The messages of `room` in `epoch` with seq in `from...to`, in seq order.
    func range(room: String, epoch: String, from: Int, to: Int) async throws -> [RoomMessage]
    /// Deletes messages older than `maxAgeMs` (0: none) and beyond the newest
    /// `maxPerRoom` of each room (0: none); returns how many went.
    func applyRetention(nowMs: Int, maxAgeMs: Int, maxPerRoom: Int) async throws -> Int
    func close() async
}

/// Opens the configured archive, or nil when `archive.kind` is none.
public enum Archive {
    public static func open(_ config: GatewayConfig, readOnly: Bool) throws -> (any ArchiveStore)? {
        switch config.archive.kind {
        case .none: return nil
        case .sqlite: return try SQLiteArchive(path: config.archiveSQLitePath, readOnly: readOnly)
        case .postgres: return try PostgresArchive(url: config.archive.postgresURL, timeoutMs: config.archive.postgresTimeoutMs)
        }
    }
}

public struct ArchiveError: Error, CustomStringConvertible, Sendable {
    public var description: String
    /// The database refused the data itself (a constraint, a value it cannot hold): the same
    /// write fails again, whenever it is tried. Otherwise it did not take the write now (a
    /// lock, a full disk, a lost connection), and the write waits to be tried again.
    public var refusesTheData: Bool

    public init(_ description: String, refusesTheData: Bool = false) {
        self.description = description
        self.refusesTheData = refusesTheData
    }
}
