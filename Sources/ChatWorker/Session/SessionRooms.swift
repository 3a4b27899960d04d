import ChatBus
import ChatProtocol

/// The rooms of one connection and where each stands, with every decision about them.
/// The session handler tells it what happened (a request, the end of a wait for the bus,
/// the bus's answer, the archive read done, the connection gone) and does what it answers:
/// the I/O (the bus, the room table, the archive, the frames) stays in the handler. Pure.
///
/// A room goes `joining` (asked the bus, or waiting to) -> `filling` (the bus answered;
/// the replay is read from the archive) -> `joined`, or straight from `joining` to
/// `joined` when the bus's answer is complete. Each join gets its own attempt number, so
/// an answer that comes after the room was left (and maybe joined again) is told apart
/// from the current one and undone.
///
/// A connection holds a few rooms at most (`limits.rooms_per_connection`), so a list
/// searched in order is as fast as a dictionary here and costs an idle member less.
struct SessionRooms {
    enum State: Equatable {
        case joining(attempt: UInt32)
        case filling(attempt: UInt32)
        case joined
    }

    private(set) var entries: [(room: String, state: State)] = []
    private var attempts: UInt32 = 0

    var count: Int { entries.count }

    subscript(room: String) -> State? {
        entries.first { $0.room == room }?.state
    }

    /// A join waits for the bus, or for the bus to be reachable.
    var isJoining: Bool {
        entries.contains { if case .joining = $0.state { true } else { false } }
    }

    /// Only a joined room takes `send`s: its `joined` has been written.
    func canSend(to room: String) -> Bool {
        self[room] == .joined
    }

    // MARK: join

    enum JoinStep: Equatable {
        /// Joined already: answer `joined` again with the room's current state.
        case joinedAlready
        case refuse(ErrorCode, String)
        /// Ask the bus (once it is reachable), as this attempt.
        case askBus(attempt: UInt32)
    }

    mutating func join(_ room: String, allowed: Bool, roomLimit: Int) -> JoinStep {
        switch self[room] {
        case .joined?: return .joinedAlready
        case .joining?, .filling?: return .refuse(.badJSON, "already joining this room")
        case nil: break
        }
        guard allowed else { return .refuse(.forbidden, "your token does not allow this room") }
        guard count < roomLimit else { return .refuse(.tooManyRooms, "at most \(roomLimit) rooms per connection") }
        attempts &+= 1
        set(room, .joining(attempt: attempts))
        return .askBus(attempt: attempts)
    }

    enum WaitStep: Equatable {
        case askBus
        /// Left (or gone) while waiting: nothing was asked, nothing to do.
        case drop
        /// The bus stayed away past the wait: the room is not joined.
        case unavailable
    }

    /// The wait for the bus ended: it is reachable (`available`), or it stayed away.
    mutating func busWaitEnded(_ room: String, attempt: UInt32, available: Bool) -> WaitStep {
        guard self[room] == .joining(attempt: attempt) else { return .drop }
        guard available else {
            remove(room)
            return .unavailable
        }
        return .askBus
    }

    enum AnswerStep: Equatable {
        /// Left or gone while the bus answered: give the bus its count back.
        case undo
        /// Left or gone, and the bus failed anyway: nothing to do.
        case drop
        /// Add the member to the room table and write the reply.
        case joined
        /// Add the member to the room table as filling, and read the archive.
        case fill
        /// The link dropped before the answer: wait for the bus and ask again (a join is
        /// safe to repeat).
        case askAgain
        /// The room is not joined: tell the client `unavailable`.
        case unavailable
    }

    /// The bus answered a join. `needsArchive`: the answer has a gap the archive can fill;
    /// `mayWaitMore`: the join's wait for the bus has time left (asked only of a failed
    /// answer: the clock is not read for every join).
    mutating func busAnswered(_ room: String, attempt: UInt32, succeeded: Bool, needsArchive: Bool, mayWaitMore: @autoclosure () -> Bool) -> AnswerStep {
        guard self[room] == .joining(attempt: attempt) else { return succeeded ? .undo : .drop }
        if succeeded {
            set(room, needsArchive ? .filling(attempt: attempt) : .joined)
            return needsArchive ? .fill : .joined
        }
        if mayWaitMore() { return .askAgain }
        remove(room)
        return .unavailable
    }

    /// The archive read of a filling room is done. True: write the reply and the frames the
    /// room table kept; the room is joined. False: it was left (or the connection went)
    /// meanwhile, and was taken out of the room table then.
    mutating func filled(_ room: String, attempt: UInt32) -> Bool {
        guard self[room] == .filling(attempt: attempt) else { return false }
        set(room, .joined)
        return true
    }

    // MARK: leave

    enum LeaveStep: Equatable {
        case notJoined
        /// `left` goes out; `quit`: the room table and the bus counted this member (joined
        /// or filling) and must be told. A room still being joined is undone when the bus
        /// answers.
        case left(quit: Bool)
    }

    mutating func leave(_ room: String) -> LeaveStep {
        guard let state = remove(room) else { return .notJoined }
        return .left(quit: Self.counted(state))
    }

    /// The connection is gone: every room it was counted in, to quit.
    mutating func departAll() -> [String] {
        defer { entries.removeAll() }
        return entries.filter { Self.counted($0.state) }.map(\.room)
    }

    private static func counted(_ state: State) -> Bool {
        if case .joining = state { return false }
        return true
    }

    // MARK: storage

    private mutating func set(_ room: String, _ state: State) {
        if let index = entries.firstIndex(where: { $0.room == room }) {
            entries[index].state = state
        } else {
            entries.append((room, state))
        }
    }

    @discardableResult
    private mutating func remove(_ room: String) -> State? {
        guard let index = entries.firstIndex(where: { $0.room == room }) else { return nil }
        return entries.remove(at: index).state
    }
}
