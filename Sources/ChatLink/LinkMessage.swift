import ChatControl
import Foundation

// The master <-> child control link: a Unix socketpair, one JSON object per line.
// It is low-rate (a heartbeat a second), so legibility wins over compactness.

/// What a child reports about itself with every heartbeat. Counters are cumulative over
/// the child's life; the master turns them into rates and into metrics that survive restarts.
public struct ChildStats: Codable, Sendable, Equatable {
    /// Worker: client connections of every transport.
    public var connections = 0
    /// Worker: of them, Server-Sent Events streams (the rest are WebSocket).
    public var eventStreamConnections = 0
    public var rooms = 0
    /// Requests received (relay: messages sequenced).
    public var messagesIn = 0
    /// Frames sent (relay: messages forwarded to workers).
    public var messagesOut = 0
    public var residentBytes = 0
    public var joins = 0
    /// Worker: join requests it sent to the bus for them (a tick's joins of one room from
    /// one resume point go as one request).
    public var busJoins = 0
    /// Room messages written to members.
    public var deliveries = 0
    public var bytesOut = 0
    public var slowConsumerDisconnects = 0
    public var floodDisconnects = 0
    /// Bus round trips (publish to sequenced answer), cumulative count per bucket of
    /// `BusLatency.bucketBounds` (the last bucket is +Inf).
    public var busLatencyBuckets: [Int] = []
    public var busLatencySumSeconds = 0.0
    /// Archiver: messages waiting to be written, and messages it could not get at all.
    public var archiveBacklog = 0
    public var archiveLost = 0
    /// Worker: room messages written to members in gathering windows (busy rooms), and the
    /// member writes those windows ended with; their ratio is frames per write.
    public var gatheredDeliveries = 0
    public var gatheredWrites = 0
    /// Worker: its rooms whose messages are gathered now, most members first (at most
    /// `GatheringRoom.reportLimit`).
    public var gatheringRooms: [GatheringRoom] = []
    /// Connections answered 503 because the process had no file left for them.
    public var fileLimitRefusals = 0

    public init() {}

    public init(connections: Int, rooms: Int, messagesIn: Int, messagesOut: Int) {
        self.connections = connections
        self.rooms = rooms
        self.messagesIn = messagesIn
        self.messagesOut = messagesOut
    }
}

/// A busy room on one worker: its messages are gathered and written to each member
/// several frames at a time.
public struct GatheringRoom: Codable, Sendable, Equatable {
    public static let reportLimit = 20
    public var room: String
    public var members: Int
    public var framesPerWrite: Double

    public init(room: String, members: Int, framesPerWrite: Double) {
        self.room = room
        self.members = members
        self.framesPerWrite = framesPerWrite
    }

    /// The same room reported by several workers as one: members added, frames per write
    /// weighted by members.
    public static func merged(_ reports: [GatheringRoom]) -> [String: GatheringRoom] {
        var rooms: [String: GatheringRoom] = [:]
        for report in reports {
            guard var room = rooms[report.room] else {
                rooms[report.room] = report
                continue
            }
            let members = room.members + report.members
            if members > 0 {
                room.framesPerWrite = (room.framesPerWrite * Double(room.members) + report.framesPerWrite * Double(report.members)) / Double(members)
            }
            room.members = members
            rooms[report.room] = room
        }
        return rooms
    }
}

/// Fixed latency buckets shared by the children that observe and the master that exports.
public enum BusLatency {
    public static let bucketBounds: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]

    /// Index of the bucket `seconds` falls in (the last index is +Inf).
    public static func bucket(for seconds: Double) -> Int {
        bucketBounds.firstIndex { seconds <= $0 } ?? bucketBounds.count
    }

    /// Round trips per bucket between two cumulative reports of one child.
    public static func increase(from before: [Int], to now: [Int]) -> [Int] {
        now.enumerated().map { index, count in max(0, count - (index < before.count ? before[index] : 0)) }
    }

    /// The `q` quantile (0...1) of the round trips counted in `counts` (one count per
    /// bucket, +Inf last), interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does, so the status page and a Grafana panel agree. A
    /// quantile in the +Inf bucket is the highest finite bound; nil without round trips.
    public static func quantile(_ q: Double, of counts: [Int]) -> Double? {
        let total = counts.reduce(0, +)
        guard total > 0 else { return nil }
        let rank = q * Double(total)
        var below = 0
        for (index, count) in counts.enumerated() where count > 0 {
            guard Double(below + count) >= rank else {
                below += count
                continue
            }
            guard index < bucketBounds.count else { return bucketBounds[bucketBounds.count - 1] }
            let lower = index == 0 ? 0 : bucketBounds[index - 1]
            return lower + (bucketBounds[index] - lower) * (rank - Double(below)) / Double(count)
        }
        return bucketBounds[bucketBounds.count - 1]
    }
}

/// Why the master asks a child to stop; workers tell their clients in `bye`.
public enum StopReason: String, Codable, Sendable {
    /// Stop now: `bye shutdown` to every client at once.
    case shutdown
    /// Stop slowly: `bye shutdown`, closes spread over the window.
    case drain
    /// A new generation took over: `bye reload`, closes spread over the window.
    case reload
}

public enum LinkMessage: Sendable, Equatable {
    /// Child -> master: serving now.
    case ready
    /// Child -> master: alive, with figures.
    case heartbeat(ChildStats)
    /// Master -> child: say goodbye to clients within `windowMs`, exit. With
    /// `keepAccepting` (a removed slot, whose socket closes with it) new arrivals are
    /// still accepted and sent on their way with `bye` instead of being left queued.
    case stop(reason: StopReason, windowMs: Int, keepAccepting: Bool)
    /// Master -> workers: close every connection of `user` with `bye kicked`.
    case kick(user: String)
    /// Master -> relay: the busiest rooms, answered with `rooms` and the same id.
    case roomsRequest(id: Int, top: Int)
    /// Relay -> master.
    case rooms(id: Int, rooms: [RoomStat])
}

extension LinkMessage: Codable {
    private enum CodingKeys: String, CodingKey { case type, stats, reason, windowMs = "window_ms", keepAccepting = "keep_accepting", user, id, top, rooms }

    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        switch try container.decode(String.self, forKey: .type) {
        case "ready": self = .ready
        case "heartbeat": self = .heartbeat(try container.decode(ChildStats.self, forKey: .stats))
        case "stop":
            self = .stop(
                reason: try container.decode(StopReason.self, forKey: .reason),
                windowMs: try container.decode(Int.self, forKey: .windowMs),
                keepAccepting: try container.decodeIfPresent(Bool.self, forKey: .keepAccepting) ?? false)
        case "kick": self = .kick(user: try container.decode(String.self, forKey: .user))
        case "rooms_request":
            self = .roomsRequest(id: try container.decode(Int.self, forKey: .id), top: try container.decode(Int.self, forKey: .top))
        case "rooms":
            self = .rooms(id: try container.decode(Int.self, forKey: .id), rooms: try container.decode([RoomStat].self, forKey: .rooms))
        case let other:
            throw DecodingError.dataCorruptedError(forKey: .type, in: container, debugDescription: "unknown link message \(other)")
        }
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .ready:
            try container.encode("ready", forKey: .type)
        case .heartbeat(let stats):
            try container.encode("heartbeat", forKey: .type)
            try container.encode(stats, forKey: .stats)
        case .stop(let reason, let windowMs, let keepAccepting):
            try container.encode("stop", forKey: .type)
            try container.encode(reason, forKey: .reason)
            try container.encode(windowMs, forKey: .windowMs)
            try container.encode(keepAccepting, forKey: .keepAccepting)
        case .kick(let user):
            try container.encode("kick", forKey: .type)
            try container.encode(user, forKey: .user)
        case .roomsRequest(let id, let top):
            try container.encode("rooms_request", forKey: .type)
            try container.encode(id, forKey: .id)
            try container.encode(top, forKey: .top)
        case .rooms(let id, let rooms):
            try container.encode("rooms", forKey: .type)
            try container.encode(id, forKey: .id)
            try container.encode(rooms, forKey: .rooms)
        }
    }

    /// One line, newline included.
    public func encodedLine() -> [UInt8] {
        // Encoding these plain values cannot fail.
        let data = (try? JSONEncoder().encode(self)) ?? Data()
        return Array(data) + [UInt8(ascii: "\n")]
    }

    public static func decode(line: some Collection<UInt8>) throws -> LinkMessage {
        try JSONDecoder().decode(LinkMessage.self, from: Data(line))
    }
}

/// Splits a byte stream into lines, refusing a line longer than `maximumLine`
/// (a peer that sends garbage is cut off instead of growing our memory).
public struct LineFramer {
    public struct LineTooLong: Error {}

    private var pending: [UInt8] = []
    public let maximumLine: Int

    public init(maximumLine: Int = 65_536) {
        self.maximumLine = maximumLine
    }

    public mutating func append(_ bytes: some Collection<UInt8>) throws(LineTooLong) -> [[UInt8]] {
        pending.append(contentsOf: bytes)
        var lines: [[UInt8]] = []
        var start = 0
        while let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
            guard newline - start <= maximumLine else { throw LineTooLong() }
            lines.append(Array(pending[start..<newline]))
            start = newline + 1
        }
        pending.removeFirst(start)
        if pending.count > maximumLine { throw LineTooLong() }
        return lines
    }
}
