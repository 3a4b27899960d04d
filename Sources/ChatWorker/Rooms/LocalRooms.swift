import ChatBus
import ChatProtocol
import NIOCore

// The worker's room table. For each room with at least one local member: the members
// (sessions on this worker's loop), and how far this worker has delivered the room
// (epoch and last seq), which both de-duplicates at the seam of a re-join and tells a
// resync after a bus outage where to resume. A room message is encoded into one
// WebSocket frame and those bytes are written to every member; each member is flushed
// once per loop tick, however many messages reached it in that tick.

final class LocalRooms {
    /// A class, so that a join or a delivery changes the room in place: a struct copied out
    /// of the table and written back copied its whole member table on every join.
    final class Room {
        var members: [ObjectIdentifier: SessionHandler] = [:]
        /// Joined at a seq this worker has not delivered up to yet (a bus whose live feed
        /// and answers travel on different connections): they become members once the
        /// room's delivery reaches the seq they were given.
        var pending: [(session: SessionHandler, fromSeq: Int)] = []
        var epoch: String
        var lastSeq: Int
        var knownMembers: Int

        init(epoch: String, lastSeq: Int, knownMembers: Int) {
            self.epoch = epoch
            self.lastSeq = lastSeq
            self.knownMembers = knownMembers
        }
    }

    private(set) var rooms: [String: Room] = [:]
    /// Members written to in this tick, each once (its `flushQueued` flag says so).
    private var dirty: [SessionHandler] = []
    private var flushScheduled = false
    private let eventLoop: any EventLoop
    private let allocator = ByteBufferAllocator()

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
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
    /// messages start).
    func add(_ session: SessionHandler, to name: String, snapshot: RoomSnapshot) {
        let room: Room
        if let existing = rooms[name] {
            room = existing
        } else {
            room = Room(epoch: snapshot.epoch, lastSeq: snapshot.seq, knownMembers: snapshot.members)
            rooms[name] = room
        }
        room.knownMembers = snapshot.members
        if room.epoch == snapshot.epoch && room.lastSeq < snapshot.seq {
            room.pending.append((session, snapshot.seq))
        } else {
            room.members[ObjectIdentifier(session)] = session
        }
    }

    /// Removes a member; the room goes away with its last member.
    func remove(_ session: SessionHandler, from name: String) {
        rooms[name]?.members[ObjectIdentifier(session)] = nil
        rooms[name]?.pending.removeAll { $0.session === session }
        if let room = rooms[name], room.members.isEmpty, room.pending.isEmpty {
            rooms[name] = nil
        }
    }

    /// Local members of a room, pending ones included.
    func memberCount(_ name: String) -> Int {
        guard let room = rooms[name] else { return 0 }
        return room.members.count + room.pending.count
    }

    /// A live message from the bus: one encoding, the same bytes to every member.
    func deliver(_ message: RoomMessage) {
        guard let room = rooms[message.room] else { return }
        if message.epoch == room.epoch && message.seq <= room.lastSeq { return }
        let epochChanged = room.epoch != message.epoch
        room.epoch = message.epoch
        room.lastSeq = message.seq
        broadcast(.message(message), to: room.members)
        deliveries += room.members.count
        if !room.pending.isEmpty {
            for (session, fromSeq) in room.pending where epochChanged || fromSeq <= message.seq {
                room.members[ObjectIdentifier(session)] = session
            }
            room.pending.removeAll { epochChanged || $0.fromSeq <= message.seq }
        }
    }

    /// Room messages written to members so far.
    private(set) var deliveries = 0

    /// After a bus outage: what the room's members missed, then the messages again available.
    func resynced(_ name: String, result: JoinResult) {
        guard let room = rooms[name] else { return }
        if let gap = result.gap {
            broadcast(.gap(room: name, from: gap.from, to: gap.to, epoch: gap.epoch), to: room.members)
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
        // Whoever was waiting for a seq is now as far as the room will get.
        for (session, _) in room.pending { room.members[ObjectIdentifier(session)] = session }
        room.pending.removeAll()
    }

    private func broadcast(_ message: ServerMessage, to members: [ObjectIdentifier: SessionHandler]) {
        let frame = FrameBytes.text(message.encoded(allocator), allocator: allocator)
        for session in members.values {
            session.write(frame)
            if !session.flushQueued {
                session.flushQueued = true
                dirty.append(session)
            }
        }
        scheduleFlush()
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
