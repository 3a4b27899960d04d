import ChatBus

/// The joins and leaves a worker's sessions asked for in one loop tick, gathered so that
/// they reach the bus as one request per room (and resume point) instead of one per member.
///
/// After a reload or a network blip every viewer of a live stream reconnects and joins the
/// same room within seconds, mostly from the same resume point (they had all seen the
/// latest message): the bus answers each group of identical joins once, counting all of
/// its members, and every member of the group gets that answer, as it would have got its
/// own. Joins go out in the order they were first asked for (`order`), so one session's
/// joins of several rooms are answered in its order unless another session asked first.
/// Leaves of a room are summed.
struct MemberRequests {
    /// What makes two joins the same request: the bus answers them alike.
    struct JoinKey: Hashable {
        var room: String
        var since: Int?
        var epoch: String?
        var history: Int
    }

    /// A member's answer, with the frames its group shares (`SharedJoinFrames`).
    typealias Answer = (Result<JoinResult, BusError>, SharedJoinFrames) -> Void

    private var order: [JoinKey] = []
    private var joins: [JoinKey: [Answer]] = [:]
    private var leaves: [String: Int] = [:]
    private var leaveOrder: [String] = []

    var isEmpty: Bool { order.isEmpty && leaveOrder.isEmpty }

    mutating func join(_ key: JoinKey, answer: @escaping Answer) {
        if joins[key] == nil { order.append(key) }
        joins[key, default: []].append(answer)
    }

    mutating func leave(_ room: String, members: Int) {
        if leaves[room] == nil { leaveOrder.append(room) }
        leaves[room, default: 0] += members
    }

    /// Everything gathered, joins (each with the answers waiting for it) in the order first
    /// asked, and each room's leaves summed; the gathering starts again empty.
    mutating func take() -> (joins: [(key: JoinKey, answers: [Answer])], leaves: [(room: String, members: Int)]) {
        let taken = (joins: order.map { ($0, joins[$0]!) }, leaves: leaveOrder.map { ($0, leaves[$0]!) })
        order.removeAll(keepingCapacity: true)
        joins.removeAll(keepingCapacity: true)
        leaves.removeAll(keepingCapacity: true)
        leaveOrder.removeAll(keepingCapacity: true)
        return taken
    }
}
