import ChatBus
import ChatControl
import ChatProtocol
import NIOCore

// The relay's rooms. Per room: an epoch (random, new whenever the room's sequence starts
// over), the last seq handed out, a bounded history (by count and by age) of the newest
// messages, oldest first, and per worker link the number of members that worker has
// there (their sum is the room's `members`; a worker with a count is sent every message).
// Pure logic, no I/O: the server feeds it requests and the clock.

/// Identifies one worker link for interest bookkeeping.
public typealias LinkID = Int

public struct RoomBook {
    public struct Limits: Sendable {
        public var historyMessages: Int
        public var historyMaxAgeMs: Int

        public init(historyMessages: Int, historyMaxAgeMs: Int) {
            self.historyMessages = historyMessages
            self.historyMaxAgeMs = historyMaxAgeMs
        }
    }

    struct Room {
        var epoch: String
        var seq = 0
        /// A ring: trimming the oldest is O(1) per message whatever `history.messages` is.
        var history = CircularBuffer<RoomMessage>()
        var interest: [LinkID: Int] = [:]
        var members: Int { interest.values.reduce(0, +) }
        var rate = RateWindow()
    }

    /// Messages per second over the last whole second.
    struct RateWindow {
        var windowStartMs = 0
        var count = 0
        var lastRate = 0.0

        mutating func record(nowMs: Int) {
            roll(nowMs: nowMs)
            count += 1
        }

        mutating func roll(nowMs: Int) {
            let elapsed = nowMs - windowStartMs
            guard elapsed >= 1000 else { return }
            // A window that ended more than a second ago saw nothing since.
            lastRate = elapsed < 2000 ? Double(count) * 1000 / Double(elapsed) : 0
            windowStartMs = nowMs
            count = 0
        }
    }

    /// Changes a room in place, creating it (with a new epoch) first if needed: a room
    /// copied out of the table and written back copied its whole history every time.
    private mutating func updateRoom<Result>(_ name: String, _ body: (inout Room) -> Result) -> Result {
        if rooms[name] == nil { rooms[name] = Room(epoch: makeEpoch()) }
        return body(&rooms[name]!)
    }

    public let limits: Limits
    private(set) var rooms: [String: Room] = [:]
    private let makeEpoch: () -> String

    public init(limits: Limits, makeEpoch: @escaping () -> String = RoomBook.randomEpoch) {
        self.limits = limits
        self.makeEpoch = makeEpoch
    }

    public static func randomEpoch() -> String {
        Epoch.random()
    }

    public var roomCount: Int { rooms.count }

    /// Appends the next message of `room` and returns it.
    public mutating func publish(room name: String, from: String, text: String, nowMs: Int) -> RoomMessage {
        let limits = limits
        return updateRoom(name) { room in
            room.seq += 1
            room.rate.record(nowMs: nowMs)
            let message = RoomMessage(room: name, seq: room.seq, epoch: room.epoch, from: from, text: text, ts: nowMs)
            room.history.append(message)
            Self.trim(&room.history, limits: limits, nowMs: nowMs)
            return message
        }
    }

    /// Rebuilds rooms from a journal, in the order the messages were sequenced.
    public mutating func restore(_ messages: [RoomMessage], nowMs: Int) {
        for message in messages {
            if rooms[message.room]?.epoch != message.epoch {
                rooms[message.room] = Room(epoch: message.epoch)
            }
            rooms[message.room]!.seq = message.seq
            rooms[message.room]!.history.append(message)
            Self.trim(&rooms[message.room]!.history, limits: limits, nowMs: nowMs)
        }
    }

    /// Every room the relay knows.
    public var roomNames: [String] { Array(rooms.keys) }

    /// Every message still held, room by room, oldest first (what a journal must keep).
    public var heldMessages: [RoomMessage] {
        rooms.values.flatMap(\.history)
    }

    /// The links that have members in `room`.
    public func interestedLinks(in name: String) -> Dictionary<LinkID, Int>.Keys? {
        rooms[name]?.interest.keys
    }

    /// Counts `members` more members of `link` in `room` and says what to replay.
    public mutating func join(room name: String, link: LinkID, members: Int, since: Int?, epoch: String?, history: Int, nowMs: Int)
        -> (snapshot: RoomSnapshot, replay: [RoomMessage], gap: Gap?)
    {
        let limits = limits
        return updateRoom(name) { room in
            if members > 0 {
                room.interest[link, default: 0] += members
            }
            Self.trim(&room.history, limits: limits, nowMs: nowMs)
            let (replay, gap) = HistoryRules.replay(held: room.history, epoch: room.epoch, seq: room.seq, since: since, epoch: epoch, history: history)
            return (RoomSnapshot(name: name, epoch: room.epoch, seq: room.seq, members: room.members), replay, gap)
        }
    }

    /// A room's state; a room nobody has used yet gets its epoch now.
    public mutating func snapshot(room name: String) -> RoomSnapshot {
        updateRoom(name) { room in RoomSnapshot(name: name, epoch: room.epoch, seq: room.seq, members: room.members) }
    }

    /// Counts `members` fewer members of `link` in `room`.
    public mutating func leave(room name: String, link: LinkID, members: Int) {
        guard let count = rooms[name]?.interest[link] else { return }
        rooms[name]!.interest[link] = count - members > 0 ? count - members : nil
    }

    /// Forgets every member of a link that went away.
    public mutating func dropLink(_ link: LinkID) {
        for name in rooms.keys where rooms[name]?.interest[link] != nil {
            rooms[name]?.interest[link] = nil
        }
    }

    /// Up to `limit` messages before `before` (default: the newest), oldest first, and
    /// whether older ones exist in the history.
    public mutating func fetch(room name: String, before: HistoryPosition?, limit: Int, nowMs: Int) -> (messages: [RoomMessage], more: Bool) {
        guard rooms[name] != nil else { return ([], false) }
        Self.trim(&rooms[name]!.history, limits: limits, nowMs: nowMs)
        let room = rooms[name]!
        return HistoryRules.page(held: room.history, epoch: room.epoch, before: before, limit: limit)
    }

    /// The rooms with the most members, with their seq and message rate.
    public mutating func stats(top: Int, nowMs: Int) -> [RoomStat] {
        for name in rooms.keys { rooms[name]?.rate.roll(nowMs: nowMs) }
        return rooms.map { RoomStat(room: $0.key, members: $0.value.members, seq: $0.value.seq, messagesPerSecond: $0.value.rate.lastRate) }
            .sorted { ($0.members, $0.messagesPerSecond, $1.room) > ($1.members, $1.messagesPerSecond, $0.room) }
            .prefix(max(0, top))
            .map { $0 }
    }

    /// Forgets rooms nobody is in whose history has expired.
    public mutating func sweep(nowMs: Int) {
        for name in Array(rooms.keys) {
            guard rooms[name] != nil else { continue }
            Self.trim(&rooms[name]!.history, limits: limits, nowMs: nowMs)
            if let room = rooms[name], room.interest.isEmpty && room.history.isEmpty {
                rooms[name] = nil
            }
        }
    }

    private static func trim(_ history: inout CircularBuffer<RoomMessage>, limits: Limits, nowMs: Int) {
        if history.count > limits.historyMessages {
            history.removeFirst(history.count - limits.historyMessages)
        }
        let oldestAllowed = nowMs - limits.historyMaxAgeMs
        if let first = history.first, first.ts < oldestAllowed {
            history.removeFirst(history.prefix { $0.ts < oldestAllowed }.count)
        }
    }
}
