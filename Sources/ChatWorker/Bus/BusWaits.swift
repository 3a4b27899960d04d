import NIOCore

/// Requests that came while the bus was unreachable, each waiting until its deadline for
/// the bus to come back (`bus.outage_wait_ms`): a relay or Redis restart takes a fraction
/// of a second, and a client told `unavailable` for it must have been written to retry.
/// Pure: the worker decides when the bus is back and when to look at the clock.
struct BusWaits<Request> {
    private var waiting: [(deadline: NIODeadline, request: Request)] = []

    var count: Int { waiting.count }

    mutating func add(_ request: Request, until deadline: NIODeadline) {
        waiting.append((deadline, request))
    }

    /// The requests whose deadline has come, oldest first; they wait no longer.
    mutating func takeExpired(now: NIODeadline) -> [Request] {
        guard waiting.contains(where: { $0.deadline <= now }) else { return [] }
        let expired = waiting.filter { $0.deadline <= now }.map(\.request)
        waiting.removeAll { $0.deadline <= now }
        return expired
    }

    /// Every waiting request, oldest first: the bus is back.
    mutating func takeAll() -> [Request] {
        defer { waiting.removeAll() }
        return waiting.map(\.request)
    }
}
