import NIOCore

/// The wait before a bus client's next connection attempt: 50 ms doubling to 1 s, and
/// back to 50 ms once a connection is up.
struct ReconnectBackoff {
    private static let first = TimeAmount.milliseconds(50)
    private static let cap = TimeAmount.seconds(1)
    private var upcoming = first

    mutating func next() -> TimeAmount {
        defer { upcoming = min(upcoming * 2, Self.cap) }
        return upcoming
    }

    mutating func reset() {
        upcoming = Self.first
    }
}
