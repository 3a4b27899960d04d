import Foundation

// The master <-> child control link: a Unix socketpair, one JSON object per line.
// It is low-rate (a heartbeat a second), so legibility wins over compactness.

/// What a child reports about itself with every heartbeat.
public struct ChildStats: Codable, Sendable, Equatable {
    public var connections: Int
    public var rooms: Int
    public var messagesIn: Int
    public var messagesOut: Int
    public var residentBytes: Int

    public init(connections: Int = 0, rooms: Int = 0, messagesIn: Int = 0, messagesOut: Int = 0, residentBytes: Int = 0) {
        self.connections = connections
        self.rooms = rooms
        self.messagesIn = messagesIn
        self.messagesOut = messagesOut
        self.residentBytes = residentBytes
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
    /// Master -> child: stop accepting, say goodbye to clients within `windowMs`, exit.
    case stop(reason: StopReason, windowMs: Int)
}

extension LinkMessage: Codable {
    private enum CodingKeys: String, CodingKey { case type, stats, reason, windowMs = "window_ms" }

    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        switch try container.decode(String.self, forKey: .type) {
        case "ready": self = .ready
        case "heartbeat": self = .heartbeat(try container.decode(ChildStats.self, forKey: .stats))
        case "stop":
            self = .stop(
                reason: try container.decode(StopReason.self, forKey: .reason),
                windowMs: try container.decode(Int.self, forKey: .windowMs))
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
        case .stop(let reason, let windowMs):
            try container.encode("stop", forKey: .type)
            try container.encode(reason, forKey: .reason)
            try container.encode(windowMs, forKey: .windowMs)
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
            lines.append(Array(pending[start..<newline]))
            start = newline + 1
        }
        pending.removeFirst(start)
        if pending.count > maximumLine { throw LineTooLong() }
        return lines
    }
}
