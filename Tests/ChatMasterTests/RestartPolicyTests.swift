import Testing
@testable import ChatMaster

@Suite struct RestartPolicyTests {
    static let settings = RestartPolicy.Settings(initialDelay: 0.1, maximumDelay: 5, stableAfter: 10, crashLoopAfter: 5)

    private func near(_ a: Double, _ b: Double) -> Bool { abs(a - b) < 1e-9 }

    @Test func delaysDoubleUpToTheCap() {
        var policy = RestartPolicy(settings: Self.settings)
        let delays = (0..<10).map { _ in policy.recordExit(uptime: 1) }
        let expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5, 5]
        #expect(zip(delays, expected).allSatisfy { near($0.0, $0.1) }, "\(delays)")
        #expect(policy.consecutiveFailures == 10)
    }

    @Test func capHoldsForever() {
        var policy = RestartPolicy(settings: Self.settings)
        var last = 0.0
        for _ in 0..<10_000 { last = policy.recordExit(uptime: 0) }
        #expect(last == 5)
        #expect(last.isFinite)
    }

    @Test func maximumBelowInitialWins() {
        var policy = RestartPolicy(settings: .init(initialDelay: 2, maximumDelay: 0.5, stableAfter: 10, crashLoopAfter: 3))
        #expect(policy.recordExit(uptime: 0) == 0.5)
    }

    @Test func stableRunResetsTheBackoff() {
        var policy = RestartPolicy(settings: Self.settings)
        for _ in 0..<4 { _ = policy.recordExit(uptime: 1) }
        #expect(policy.consecutiveFailures == 4)
        // Up exactly `stableAfter`: counts as stable; this exit is the first of a new run.
        #expect(near(policy.recordExit(uptime: 10), 0.1))
        #expect(policy.consecutiveFailures == 1)
        #expect(near(policy.recordExit(uptime: 0.5), 0.2))
    }

    @Test func justUnderStableAfterIsStillAFailure() {
        var policy = RestartPolicy(settings: Self.settings)
        #expect(near(policy.recordExit(uptime: 9.99), 0.1))
        #expect(near(policy.recordExit(uptime: 9.99), 0.2))
        #expect(near(policy.recordExit(uptime: 9.99), 0.4))
        #expect(policy.consecutiveFailures == 3)
    }

    @Test func crashLoopingAfterConsecutiveFailures() {
        var policy = RestartPolicy(settings: Self.settings)
        #expect(!policy.isCrashLooping)
        for failure in 1...4 {
            _ = policy.recordExit(uptime: 0)
            #expect(!policy.isCrashLooping, "after \(failure) failures")
        }
        _ = policy.recordExit(uptime: 0)
        #expect(policy.isCrashLooping)
        _ = policy.recordExit(uptime: 0)
        #expect(policy.isCrashLooping)
    }

    @Test func stableExitEndsACrashLoop() {
        var policy = RestartPolicy(settings: Self.settings)
        for _ in 0..<5 { _ = policy.recordExit(uptime: 0) }
        #expect(policy.isCrashLooping)
        _ = policy.recordExit(uptime: 60)
        #expect(!policy.isCrashLooping)
    }

    @Test func recordStableClearsTheHistory() {
        var policy = RestartPolicy(settings: Self.settings)
        for _ in 0..<6 { _ = policy.recordExit(uptime: 0) }
        #expect(policy.isCrashLooping)
        policy.recordStable()
        #expect(!policy.isCrashLooping)
        #expect(policy.consecutiveFailures == 0)
        #expect(near(policy.recordExit(uptime: 0), 0.1))
    }

    @Test func totalRestartsCountsEveryExit() {
        var policy = RestartPolicy(settings: Self.settings)
        #expect(policy.totalRestarts == 0)
        _ = policy.recordExit(uptime: 0)
        _ = policy.recordExit(uptime: 100)
        policy.recordStable()
        _ = policy.recordExit(uptime: 3)
        #expect(policy.totalRestarts == 3)
        #expect(policy.consecutiveFailures == 1)
    }

    @Test func crashLoopAfterOne() {
        var policy = RestartPolicy(settings: .init(initialDelay: 0.1, maximumDelay: 5, stableAfter: 10, crashLoopAfter: 1))
        #expect(!policy.isCrashLooping)
        _ = policy.recordExit(uptime: 0)
        #expect(policy.isCrashLooping)
    }

    @Test func equatable() {
        var a = RestartPolicy(settings: Self.settings)
        let b = RestartPolicy(settings: Self.settings)
        #expect(a == b)
        _ = a.recordExit(uptime: 0)
        #expect(a != b)
    }
}
