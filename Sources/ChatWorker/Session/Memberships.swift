/// The rooms one connection is in or joining, keyed by name. A connection holds a few
/// rooms at most (`limits.rooms_per_connection`), so a list searched in order is as fast
/// as a dictionary here and costs an idle member half the memory.
struct Memberships<State: Equatable> {
    /// Every room and its state, in the order they were added.
    private(set) var entries: [(room: String, state: State)] = []

    var count: Int { entries.count }

    subscript(room: String) -> State? {
        get { entries.first { $0.room == room }?.state }
        set {
            let index = entries.firstIndex { $0.room == room }
            switch (index, newValue) {
            case let (index?, state?): entries[index].state = state
            case let (index?, nil): entries.remove(at: index)
            case let (nil, state?): entries.append((room, state))
            case (nil, nil): break
            }
        }
    }

    mutating func removeValue(forKey room: String) -> State? {
        guard let index = entries.firstIndex(where: { $0.room == room }) else { return nil }
        return entries.remove(at: index).state
    }

    mutating func removeAll() {
        entries.removeAll()
    }
}
