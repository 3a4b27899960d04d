/// How a room's messages reach its members: written at the end of the loop tick they came
/// in (quiet rooms), or gathered for a short window and written together (busy rooms).
///
/// The kernel's share of a `write(2)` is most of a delivery's cost, and in a room with
/// tens of messages per second every member would get one write per message. Gathering
/// them turns k messages into one write of k frames. A room is busy when its messages come
/// closer together than two thirds of `delivery.max_delay_ms` (so a window holds one and a
/// half or more: a room right at two per window would flap between the two ways, and the
/// way at once costs several times more);
/// the window is as long as about `targetFrames` messages take, never longer than the
/// maximum. The pace is a moving average of the gaps between messages, each gap counted
/// as at most four maximum delays, so that a room cools down within a few messages.
///
/// Writing a window to every member of a big room takes time (9,000 members of a worker:
/// a good part of 100 ms), and messages that come meanwhile wait for it before their own
/// window starts. So a window is shortened by how long the room's last write took: the
/// cycle (window plus write) stays as long as the window was meant to be, which keeps the
/// frames per write and takes the write's time off every message's wait.
struct DeliveryPace {
    enum Decision: Equatable {
        /// Written at the end of this loop tick.
        case now
        /// Gathered: the room's members are flushed this many nanoseconds from now, unless
        /// a window is already open.
        case gather(windowNanos: UInt64)
    }

    /// A longer window holds more frames per write but adds latency for nothing once the
    /// per-write cost is spread thin.
    static let targetFrames = 8.0
    private static let weight = 1.0 / 8

    let maxDelayNanos: Double
    private var lastArrival: UInt64?
    /// Smoothed gap between messages, nanoseconds.
    private(set) var meanGapNanos: Double
    /// Smoothed frames per member write over the room's recent windows (1 while quiet).
    private(set) var framesPerWrite = 1.0
    /// How long writing the room's last window to its members took, nanoseconds.
    private(set) var lastWriteNanos: UInt64 = 0

    init(maxDelayMs: Int) {
        maxDelayNanos = Double(maxDelayMs) * 1_000_000
        meanGapNanos = maxDelayNanos * 4
    }

    var isGathering: Bool { maxDelayNanos > 0 && meanGapNanos * 1.5 <= maxDelayNanos }

    /// A message of the room arrived at `now` (monotonic nanoseconds).
    mutating func arrived(at now: UInt64) -> Decision {
        if let last = lastArrival {
            let gap = min(Double(now &- last), maxDelayNanos * 4)
            meanGapNanos += (gap - meanGapNanos) * Self.weight
        }
        lastArrival = now
        guard isGathering else { return .now }
        let cycle = UInt64(min(maxDelayNanos, meanGapNanos * Self.targetFrames))
        return .gather(windowNanos: cycle > lastWriteNanos ? cycle - lastWriteNanos : 0)
    }

    /// A window closed after gathering `frames` messages for each member, and writing them
    /// to the members took `tookNanos`.
    mutating func wrote(frames: Int, tookNanos: UInt64) {
        framesPerWrite += (Double(frames) - framesPerWrite) * Self.weight
        lastWriteNanos = tookNanos
    }

    /// The room went quiet again: its writes are one frame each.
    mutating func cooled() {
        framesPerWrite = 1
        lastWriteNanos = 0
    }
}
