import Testing
@testable import ChatWorker

private let ms: UInt64 = 1_000_000

/// Feeds `count` messages `gapMs` apart from `start`; returns the last decision and the time after.
private func feed(_ pace: inout DeliveryPace, count: Int, gapMs: UInt64, from start: UInt64) -> (DeliveryPace.Decision, UInt64) {
    var now = start
    var decision = DeliveryPace.Decision.now
    for _ in 0..<count {
        decision = pace.arrived(at: now)
        now += gapMs * ms
    }
    return (decision, now)
}

@Suite struct DeliveryPaceTests {
    @Test func aQuietRoomIsWrittenAtOnce() {
        var pace = DeliveryPace(maxDelayMs: 100)
        let (decision, _) = feed(&pace, count: 50, gapMs: 500, from: 1_000 * ms)
        #expect(decision == .now)
        #expect(!pace.isGathering)
    }

    @Test func aBusyRoomGathersForAboutEightMessagesAtMostTheMaximum() {
        var pace = DeliveryPace(maxDelayMs: 200)
        // 20 msg/s: a window of 200 ms holds four messages, so they are gathered; eight
        // would take 400 ms, so the window is the maximum.
        var (decision, now) = feed(&pace, count: 40, gapMs: 50, from: 1_000 * ms)
        guard case .gather(let window) = decision else {
            Issue.record("20 msg/s against a 200 ms maximum delay was not gathered: \(decision)")
            return
        }
        #expect(window == 200 * ms)
        // 500 msg/s: eight messages take 16 ms, so the window shrinks to that.
        (decision, now) = feed(&pace, count: 100, gapMs: 2, from: now)
        guard case .gather(let shorter) = decision else {
            Issue.record("500 msg/s was not gathered: \(decision)")
            return
        }
        #expect(shorter >= 15 * ms && shorter <= 20 * ms, "window \(shorter / ms) ms at 2 ms between messages")
    }

    @Test func aRoomUnderOneAndAHalfMessagesPerWindowIsNotGathered() {
        var pace = DeliveryPace(maxDelayMs: 100)
        let (decision, _) = feed(&pace, count: 100, gapMs: 70, from: 1_000 * ms)
        #expect(decision == .now)
    }

    @Test func aRoomThatGoesQuietIsWrittenAtOnceWithinAFewMessages() {
        var pace = DeliveryPace(maxDelayMs: 100)
        var (_, now) = feed(&pace, count: 100, gapMs: 10, from: 1_000 * ms)
        #expect(pace.isGathering)
        // One message every 2 s: each gap counts as 400 ms at most, so the average is past
        // 50 ms after a handful of them.
        var decision = DeliveryPace.Decision.now
        var gathered = 0
        for _ in 0..<10 {
            now += 2_000 * ms
            decision = pace.arrived(at: now)
            if decision != .now { gathered += 1 }
        }
        #expect(decision == .now)
        #expect(gathered <= 3, "\(gathered) of 10 slow messages were still gathered")
    }

    @Test func zeroMaximumDelayNeverGathers() {
        var pace = DeliveryPace(maxDelayMs: 0)
        let (decision, _) = feed(&pace, count: 1_000, gapMs: 0, from: 1_000 * ms)
        #expect(decision == .now)
    }

    @Test func framesPerWriteFollowsTheWindowsAndResetsWhenQuiet() {
        var pace = DeliveryPace(maxDelayMs: 100)
        for _ in 0..<100 { pace.wrote(frames: 5, tookNanos: 0) }
        #expect(pace.framesPerWrite > 4.9 && pace.framesPerWrite <= 5)
        pace.cooled()
        #expect(pace.framesPerWrite == 1)
    }

    @Test func aLongWriteShortensTheNextWindowSoTheCycleKeepsItsLength() {
        var pace = DeliveryPace(maxDelayMs: 200)
        var (decision, now) = feed(&pace, count: 40, gapMs: 50, from: 1_000 * ms)
        #expect(decision == .gather(windowNanos: 200 * ms))
        pace.wrote(frames: 4, tookNanos: 120 * ms)
        (decision, now) = feed(&pace, count: 1, gapMs: 50, from: now)
        #expect(decision == .gather(windowNanos: 80 * ms), "a 200 ms cycle with a 120 ms write leaves an 80 ms window")
        pace.wrote(frames: 4, tookNanos: 300 * ms)
        (decision, _) = feed(&pace, count: 1, gapMs: 50, from: now)
        #expect(decision == .gather(windowNanos: 0), "a write longer than the cycle: the next window closes at once")
    }
}
