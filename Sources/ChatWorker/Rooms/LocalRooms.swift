import ChatBus
import ChatLink
import ChatProtocol
import NIOCore

// The worker's room table. For each room with at least one local member: the members
// (sessions on this worker's loop), and how far this worker has delivered the room
// (epoch and last seq), which tells a resync after a bus outage where to resume. A room message is encoded into one
// WebSocket frame and those bytes are written to every member. A quiet room's members are
// flushed once per loop tick, however many messages reached them in that tick; a busy
// room's are flushed once per gathering window (`DeliveryPace`), so each member gets the
// window's frames in one write. Writes still happen in arrival order, so a member's frames
// keep their order across rooms and with its own answers; only the flush waits.
//
// The bus gives each room's messages once, in order, and answers a join at its place in
// that stream (the `Bus` protocol): a member answered now gets every live message from now
// on. The one wait the room table owns is its own: a `filling` member, whose join's replay
// is still being read from the archive. Live messages of the room past the join's seq are
// kept for it (encoded once, shared with the members) and handed over when the fill is
// done, after the replay: replayed messages precede live ones (docs/PROTOCOL.md).

final class LocalRooms {
    /// A class, so that a join or a delivery changes the room in place: a struct copied out
    /// of the table and written back copied its whole member table on every join.
    final class Room {
        var members: [ObjectIdentifier: SessionHandler] = [:]
        /// Joined while its replay is read from the archive: the live frames it will get
        /// once the replay is out.
        var filling: [ObjectIdentifier: Filling] = [:]
        var epoch: String
        var lastSeq: Int
        var knownMembers: Int
        var pace: DeliveryPace
        /// The open gathering window's flush, and the messages written in it so far.
        var windowFlush: Scheduled<Void>?
        var gathered = 0

        init(epoch: String, lastSeq: Int, knownMembers: Int, maxDelayMs: Int) {
            self.epoch = epoch
            self.lastSeq = lastSeq
            self.knownMembers = knownMembers
            pace = DeliveryPace(maxDelayMs: maxDelayMs)
        }
    }

    /// A member whose replay is being read: where its live messages start, and those that
    /// came meanwhile.
    struct Filling {
        var session: SessionHandler
        var epoch: String
        var fromSeq: Int
        var frames: [ByteBuffer] = []

        /// Whether a live message belongs after the replay the join answered with.
        func follows(_ message: RoomMessage) -> Bool {
            message.epoch != epoch || message.seq > fromSeq
        }
    }

    private(set) var rooms: [String: Room] = [:]
    /// Members written to in this tick, each once (its `flushQueued` flag says so).
    private var dirty: [SessionHandler] = []
    private var flushScheduled = false
    private let eventLoop: any EventLoop
    private let allocator = ByteBufferAllocator()
    private let maxDelayMs: Int

    init(eventLoop: any EventLoop, maxDelayMs: Int) {
        self.eventLoop = eventLoop
        self.maxDelayMs = maxDelayMs
    }

    var count: Int { rooms.count }

    func room(_ name: String) -> Room? { rooms[name] }

    /// The table's own copy of a room name when the room has local members: a session that
    /// keeps this one instead of its join request's copy saves an allocation per member.
    func sharedName(_ name: String) -> String {
        guard let index = rooms.index(forKey: name) else { return name }
        return rooms.keys[index]
    }

    /// Adds a member once the bus answered its join (the answer's seq is where its live
    /// messages start). A member whose replay is still to be read from the archive
    /// (`filling`) gets nothing until `finishFilling`.
    func add(_ session: SessionHandler, to name: String, snapshot: RoomSnapshot, filling: Bool = false) {
        let room: Room
        if let existing = rooms[name] {
            room = existing
        } else {
            room = Room(epoch: snapshot.epoch, lastSeq: snapshot.seq, knownMembers: snapshot.members, maxDelayMs: maxDelayMs)
            rooms[name] = room
        }
        room.knownMembers = snapshot.members
        if filling {
            room.filling[ObjectIdentifier(session)] = Filling(session: session, epoch: snapshot.epoch, fromSeq: snapshot.seq)
        } else {
            room.members[ObjectIdentifier(session)] = session
        }
    }

    /// The replay of a filling member is written: the live frames kept for it, in order
    /// (the caller writes them), and from now on it is a member like any other.
    func finishFilling(_ session: SessionHandler, in name: String) -> [ByteBuffer] {
        guard let room = rooms[name], let filling = room.filling.removeValue(forKey: ObjectIdentifier(session)) else { return [] }
        room.members[ObjectIdentifier(session)] = session
        return filling.frames
    }

    /// Removes a member; the room goes away with its last member.
    func remove(_ session: SessionHandler, from name: String) {
        rooms[name]?.members[ObjectIdentifier(session)] = nil
        rooms[name]?.filling[ObjectIdentifier(session)] = nil
        if let room = rooms[name], room.members.isEmpty, room.filling.isEmpty {
            room.windowFlush?.cancel()
            rooms[name] = nil
        }
    }

    /// Local members of a room, filling ones included.
    func memberCount(_ name: String) -> Int {
        guard let room = rooms[name] else { return 0 }
        return room.members.count + room.filling.count
    }

    /// A live message from the bus: one encoding, the same bytes to every member.
    func deliver(_ message: RoomMessage) {
        guard let room = rooms[message.room] else { return }
        room.epoch = message.epoch
        room.lastSeq = message.seq
        let frame: ByteBuffer
        switch room.pace.arrived(at: NIODeadline.now().uptimeNanoseconds) {
        case .now:
            closeWindow(of: room)
            frame = broadcast(.message(message), to: room.members)
        case .gather(let window):
            frame = encode(.message(message))
            for session in room.members.values { session.write(frame) }
            room.gathered += 1
            gatheredDeliveries += room.members.count
            if room.windowFlush == nil {
                room.windowFlush = eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(Int64(window))) { [self] in
                    closeWindow(of: room)
                }
            }
        }
        deliveries += room.members.count
        if !room.filling.isEmpty {
            for (id, filling) in room.filling where filling.follows(message) {
                room.filling[id]!.frames.append(frame)
            }
        }
    }

    /// Room messages written to members so far; of them, written in gathering windows, and
    /// the member writes those windows ended with (their ratio: frames per write).
    private(set) var deliveries = 0
    private(set) var gatheredDeliveries = 0
    private(set) var gatheredWrites = 0

    /// Ends a room's gathering window: every member gets the window's frames in one write.
    /// A room that is quiet again is written per tick from now on.
    private func closeWindow(of room: Room) {
        guard let flush = room.windowFlush else {
            if !room.pace.isGathering { room.pace.cooled() }
            return
        }
        flush.cancel()
        room.windowFlush = nil
        room.pace.wrote(frames: room.gathered)
        room.gathered = 0
        gatheredWrites += room.members.count
        for session in room.members.values { session.flush() }
    }

    /// The rooms whose messages are gathered now, busiest first, with their frames per write.
    func gatheringRooms(limit: Int) -> [GatheringRoom] {
        rooms.filter { $0.value.pace.isGathering }
            .map { GatheringRoom(room: $0.key, members: $0.value.members.count, framesPerWrite: $0.value.pace.framesPerWrite) }
            .sorted { $0.members > $1.members }
            .prefix(limit).map { $0 }
    }

    /// After a bus outage: what the room's members missed, then the messages again available.
    func resynced(_ name: String, result: JoinResult) {
        guard let room = rooms[name] else { return }
        // What was gathered before the outage goes out before the gap.
        closeWindow(of: room)
        if let gap = result.gap {
            let frame = broadcast(.gap(room: name, from: gap.from, to: gap.to, epoch: gap.epoch), to: room.members)
            for id in room.filling.keys { room.filling[id]!.frames.append(frame) }
        }
        if room.epoch != result.room.epoch {
            room.epoch = result.room.epoch
            room.lastSeq = 0
        }
        room.knownMembers = result.room.members
        for message in result.replay {
            deliver(message)
        }
        if result.room.seq > room.lastSeq {
            room.lastSeq = result.room.seq
        }
    }

    @discardableResult
    private func broadcast(_ message: ServerMessage, to members: [ObjectIdentifier: SessionHandler]) -> ByteBuffer {
        let frame = encode(message)
        for session in members.values {
            session.write(frame)
            if !session.flushQueued {
                session.flushQueued = true
                dirty.append(session)
            }
        }
        scheduleFlush()
        return frame
    }

    private func encode(_ message: ServerMessage) -> ByteBuffer {
        FrameBytes.text(message.encoded(allocator), allocator: allocator)
    }

    private func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        // Runs after this tick's I/O events: one flush per member per tick.
        eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            let members = dirty
            dirty.removeAll(keepingCapacity: true)
            for session in members {
                session.flushQueued = false
                session.flush()
            }
        }
    }
}
