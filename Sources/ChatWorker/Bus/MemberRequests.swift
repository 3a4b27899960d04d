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

    /// The tick's groups of joins in the order first asked, and where each key's group is:
    /// one look-up per join, and `take` hands the groups over as they are.
    private var joins: [(key: JoinKey, answers: [Answer])] = []
    private var joinGroup: [JoinKey: Int] = [:]
    private var leaves: [(room: String, members: Int)] = []
    private var leaveGroup: [String: Int] = [:]

    var isEmpty: Bool { joins.isEmpty && leaves.isEmpty }

    mutating func join(_ key: JoinKey, answer: @escaping Answer) {
        let group = Self.group(&joinGroup[key, default: joins.count])
        if group == joins.count {
            joins.append((key, [answer]))
        } else {
            joins[group].answers.append(answer)
        }
    }

    mutating func leave(_ room: String, members: Int) {
        let group = Self.group(&leaveGroup[room, default: leaves.count])
        if group == leaves.count {
            leaves.append((room, members))
        } else {
            leaves[group].members += members
        }
    }

    /// A key's group, found or (the next index) added in the same look-up: a dictionary's
    /// `[key, default:]` accessed in place inserts its default.
    private static func group(_ index: inout Int) -> Int { index }

    /// Everything gathered, joins (each with the answers waiting for it) in the order first
    /// asked, and each room's leaves summed; the gathering starts again empty.
    mutating func take() -> (joins: [(key: JoinKey, answers: [Answer])], leaves: [(room: String, members: Int)]) {
        let taken = (joins: joins, leaves: leaves)
        joins = []
        leaves = []
        joinGroup.removeAll(keepingCapacity: true)
        leaveGroup.removeAll(keepingCapacity: true)
        return taken
    }
}
