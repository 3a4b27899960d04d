import ChatControl

/// The busiest rooms as the status page shows them: the relay's last answer to the same
/// `rooms` request `chatctl rooms` makes. The page is answered at once from this, and each
/// answer asks the relay again for the next poll, because the supervision loop must never
/// wait on the relay (a hung or restarting relay must not hold the page, nor the loop).
struct TopRooms {
    static let count = 10
    /// An answer not come by then is given up, so a lost one cannot stop the asking.
    static let answerTimeout = 5.0

    private(set) var rooms: [RoomStat]?
    private(set) var error: String?
    private var askedAt: Double?

    /// Whether to send a new request now (none in flight, or the last one given up).
    mutating func shouldAsk(at now: Double) -> Bool {
        if let askedAt, now - askedAt < Self.answerTimeout { return false }
        askedAt = now
        return true
    }

    mutating func answered(_ response: ControlResponse) {
        askedAt = nil
        if response.ok {
            rooms = response.rooms ?? []
            error = nil
        } else {
            // Stale rooms would look live: show why there are none instead.
            rooms = nil
            error = response.error
        }
    }
}
