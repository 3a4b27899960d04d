import ChatBus
import ChatLink
import ChatProtocol
import NIOCore

// The worker's room table. For each room with at least one local member: the members
// (sessions on this worker's loop), and how far this worker has delivered the room
// (epoch and last seq), which tells a resync after a bus outage where to resume. A room message is encoded once per
// transport that has members in the room (a WebSocket frame, an SSE event) and those bytes are written to every member
// of that transport; an SSE member adds its own `id:` line before them. A quiet room's members are
// flushed once per loop tick, however many messages reached them in that tick. A busy
// room gathers its messages for a window (`DeliveryPace`): its WebSocket frames go back to
// back into one buffer, and when the window ends each member gets that buffer in one write
// (one write and one flush per member per window, not one per message). A member that
// joined during the window gets the part after its join; the ack of a member's own send
// waits behind the window's frames, so it still follows its message. Event stream members
// carry an `id:` line of their own per message, so theirs are queued per message and
// flushed at the window's end.
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
        /// Members by transport: each message is encoded once for each group that has
        /// anyone in it.
        var webSocket = MemberGroup()
        var eventStream = MemberGroup()

        /// `change` applied to the group of `session`'s transport, in place. A switch: a key
        /// path to the group would be resolved at run time, on every join.
        func changeGroup<Changed>(of session: SessionHandler, _ change: (inout MemberGroup) -> Changed) -> Changed {
            session.isEventStream ? change(&eventStream) : change(&webSocket)
        }
        var epoch: String
        var lastSeq: Int
        var knownMembers: Int
        var pace: DeliveryPace
        /// The open gathering window's flush, the messages gathered in it so far, and its
        /// WebSocket frames.
        var windowFlush: Scheduled<Void>?
        var gathered = 0
        var window = GatheredFrames()

        init(epoch: String, lastSeq: Int, knownMembers: Int, maxDelayMs: Int) {
            self.epoch = epoch
            self.lastSeq = lastSeq
            self.knownMembers = knownMembers
            pace = DeliveryPace(maxDelayMs: maxDelayMs)
        }
    }

    /// A window's WebSocket frames, back to back: encoded once, written to each member in
    /// one go when the window ends.
    struct GatheredFrames {
        var bytes: ByteBuffer?
        var count = 0
        /// Members that joined during the window: where in `bytes` their messages start.
        var joinedAt: [ObjectIdentifier: (offset: Int, count: Int)] = [:]
        /// A member's own frames that must follow the window's (the ack of its send).
        var trailing: [ObjectIdentifier: [ByteBuffer]] = [:]

        mutating func append(_ frame: ByteBuffer, allocator: ByteBufferAllocator) {
            var frame = frame
            if bytes == nil { bytes = allocator.buffer(capacity: frame.readableBytes * 8) }
            bytes!.writeBuffer(&frame)
            count += 1
        }

        mutating func joined(_ id: ObjectIdentifier) {
            joinedAt[id] = (bytes?.readableBytes ?? 0, count)
        }

        /// What a member gets of the window: the frames since it joined, if any.
        func part(for id: ObjectIdentifier) -> (bytes: ByteBuffer, count: Int)? {
            guard let bytes else { return nil }
            guard let start = joinedAt[id] else { return (bytes, count) }
            guard start.count < count else { return nil }
            return (bytes.getSlice(at: bytes.readerIndex + start.offset, length: bytes.readableBytes - start.offset)!, count - start.count)
        }
    }

    /// The members of one transport in a room.
    struct MemberGroup {
        var members: [ObjectIdentifier: SessionHandler] = [:]
        /// Joined while its replay is read from the archive: the live frames it will get
        /// once the replay is out.
        var filling: [ObjectIdentifier: Filling] = [:]

        var isEmpty: Bool { members.isEmpty && filling.isEmpty }
        var count: Int { members.count + filling.count }

        mutating func remove(_ id: ObjectIdentifier) {
            members[id] = nil
            filling[id] = nil
        }
    }

    /// A member whose replay is being read: where its live messages start, and those that
    /// came meanwhile.
    struct Filling {
        var session: SessionHandler
        var epoch: String
        var fromSeq: Int
        var frames: [RoomFrame] = []

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
        let id = ObjectIdentifier(session)
        room.changeGroup(of: session) { group in
            if filling {
                group.filling[id] = Filling(session: session, epoch: snapshot.epoch, fromSeq: snapshot.seq)
            } else {
                group.members[id] = session
            }
        }
        if !filling, room.windowFlush != nil { room.window.joined(id) }
    }

    /// The replay of a filling member is written: the live frames kept for it, in order
    /// (the caller writes them), and from now on it is a member like any other.
    func finishFilling(_ session: SessionHandler, in name: String) -> [RoomFrame] {
        let id = ObjectIdentifier(session)
        guard let room = rooms[name] else { return [] }
        let finished = room.changeGroup(of: session) { group -> Filling? in
            guard let filling = group.filling.removeValue(forKey: id) else { return nil }
            group.members[id] = session
            return filling
        }
        guard let filling = finished else { return [] }
        // The frames kept for it include the open window's so far.
        if room.windowFlush != nil { room.window.joined(id) }
        return filling.frames
    }

    /// Removes a member; the room goes away with its last member.
    func remove(_ session: SessionHandler, from name: String) {
        guard let room = rooms[name] else { return }
        let id = ObjectIdentifier(session)
        if room.windowFlush != nil, room.webSocket.members[id] != nil {
            // What came before its leave is its own: it goes out ahead of `left`.
            writeWindow(of: room, to: session, id: id)
            room.window.joinedAt[id] = nil
        }
        room.webSocket.remove(ObjectIdentifier(session))
        room.eventStream.remove(ObjectIdentifier(session))
        if room.webSocket.isEmpty, room.eventStream.isEmpty {
            room.windowFlush?.cancel()
            rooms[name] = nil
        }
    }

    /// Local members of a room, filling ones included.
    func memberCount(_ name: String) -> Int {
        guard let room = rooms[name] else { return 0 }
        return room.webSocket.count + room.eventStream.count
    }

    /// A live message from the bus: one encoding per transport, the same bytes to every
    /// member of that transport.
    func deliver(_ message: RoomMessage) {
        guard let room = rooms[message.room] else { return }
        room.epoch = message.epoch
        room.lastSeq = message.seq
        let mark = StreamMark(room: message.room, epoch: message.epoch, seq: message.seq)
        let members = room.webSocket.members.count + room.eventStream.members.count
        let frames: Encoded
        switch room.pace.arrived(at: NIODeadline.now().uptimeNanoseconds) {
        case .now:
            closeWindow(of: room)
            frames = broadcast(.message(message), mark: mark, in: room)
        case .gather(let window):
            frames = gather(.message(message), mark: mark, in: room)
            room.gathered += 1
            gatheredDeliveries += members
            if room.windowFlush == nil {
                room.windowFlush = eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(Int64(window))) { [self] in
                    closeWindow(of: room)
                }
            }
        }
        deliveries += members
        keep(frames, mark: mark, in: room) { $0.follows(message) }
    }

    /// A message encoded for each transport whose group in the room is not empty.
    private struct Encoded {
        var frame: ByteBuffer?
        var event: ByteBuffer?
    }

    /// The message in each transport that has anyone in the room, filling members included.
    private func encode(_ message: ServerMessage, in room: Room) -> Encoded {
        Encoded(frame: room.webSocket.isEmpty ? nil : FrameBytes.text(message, allocator: allocator),
                event: room.eventStream.isEmpty ? nil : EventStreamBytes.event(message, allocator: allocator))
    }

    /// Writes a room message to every member, encoded once per transport, and flushes
    /// them at the end of this tick.
    private func broadcast(_ message: ServerMessage, mark: StreamMark, in room: Room) -> Encoded {
        let encoded = encode(message, in: room)
        if let frame = encoded.frame {
            for session in room.webSocket.members.values {
                session.write(frame)
                queueFlushOf(session)
            }
        }
        if let event = encoded.event {
            for session in room.eventStream.members.values {
                session.write(event: event, at: mark)
                queueFlushOf(session)
            }
        }
        scheduleFlush()
        return encoded
    }

    /// A busy room's message: its WebSocket frame into the window's frames, its event
    /// stream event queued to each such member (each with its own id line).
    private func gather(_ message: ServerMessage, mark: StreamMark, in room: Room) -> Encoded {
        let encoded = encode(message, in: room)
        if let frame = encoded.frame, !room.webSocket.members.isEmpty { room.window.append(frame, allocator: allocator) }
        if let event = encoded.event {
            for session in room.eventStream.members.values { session.write(event: event, at: mark) }
        }
        return encoded
    }

    /// Holds a frame of a member's own (the ack of its send) behind the room's open window,
    /// which holds the message it follows; false when the room has no window open for it.
    func holdBehindWindow(_ frame: ByteBuffer, for session: SessionHandler, in name: String) -> Bool {
        let id = ObjectIdentifier(session)
        guard let room = rooms[name], room.windowFlush != nil, room.webSocket.members[id] != nil else { return false }
        room.window.trailing[id, default: []].append(frame)
        return true
    }

    /// Writes a WebSocket member its part of the open window, then what waits behind it.
    private func writeWindow(of room: Room, to session: SessionHandler, id: ObjectIdentifier) {
        if let part = room.window.part(for: id) { session.write(part.bytes, frames: part.count) }
        if let trailing = room.window.trailing.removeValue(forKey: id) {
            for frame in trailing { session.write(frame) }
        }
    }

    /// Live frames for the filling members that `wants` them, each in its transport's encoding.
    private func keep(_ encoded: Encoded, mark: StreamMark, in room: Room, where wants: (Filling) -> Bool) {
        if let frame = encoded.frame, !room.webSocket.filling.isEmpty {
            for (id, filling) in room.webSocket.filling where wants(filling) {
                room.webSocket.filling[id]!.frames.append(RoomFrame(bytes: frame, mark: mark))
            }
        }
        if let event = encoded.event, !room.eventStream.filling.isEmpty {
            for (id, filling) in room.eventStream.filling where wants(filling) {
                room.eventStream.filling[id]!.frames.append(RoomFrame(bytes: event, mark: mark))
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
        let started = NIODeadline.now().uptimeNanoseconds
        gatheredWrites += room.webSocket.members.count + room.eventStream.members.count
        for (id, session) in room.webSocket.members {
            writeWindow(of: room, to: session, id: id)
            session.flush()
        }
        room.window = GatheredFrames()
        for session in room.eventStream.members.values { session.flush() }
        room.pace.wrote(frames: room.gathered, tookNanos: NIODeadline.now().uptimeNanoseconds - started)
        room.gathered = 0
    }

    /// The rooms whose messages are gathered now, busiest first, with their frames per write.
    func gatheringRooms(limit: Int) -> [GatheringRoom] {
        rooms.filter { $0.value.pace.isGathering }
            .map { GatheringRoom(room: $0.key, members: $0.value.webSocket.members.count + $0.value.eventStream.members.count,
                                 framesPerWrite: $0.value.pace.framesPerWrite) }
            .sorted { $0.members > $1.members }
            .prefix(limit).map { $0 }
    }

    /// After a bus outage: what the room's members missed, then the messages again available.
    func resynced(_ name: String, result: JoinResult) {
        guard let room = rooms[name] else { return }
        // What was gathered before the outage goes out before the gap.
        closeWindow(of: room)
        if let gap = result.gap {
            let mark = StreamMark(room: name, epoch: gap.epoch, seq: gap.to)
            let frames = broadcast(.gap(room: name, from: gap.from, to: gap.to, epoch: gap.epoch), mark: mark, in: room)
            keep(frames, mark: mark, in: room) { _ in true }
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

    private func queueFlushOf(_ session: SessionHandler) {
        guard !session.flushQueued else { return }
        session.flushQueued = true
        dirty.append(session)
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

/// A room's message as encoded for one transport, and where it leaves the room (an event
/// stream member's id says so).
struct RoomFrame {
    var bytes: ByteBuffer
    var mark: StreamMark
}
