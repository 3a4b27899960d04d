import ChatSystem
import Testing

@Suite struct LogPaceTests {
    @Test func oneLineAnIntervalWithTheCountHeldBack() {
        var pace = LogPace(intervalSeconds: 60)
        #expect(pace.admit(now: 1000) == 0)
        #expect(pace.admit(now: 1001) == nil)
        #expect(pace.admit(now: 1059.9) == nil)
        #expect(pace.admit(now: 1060) == 2)
        #expect(pace.admit(now: 1061) == nil)
        #expect(pace.admit(now: 2000) == 1)
        #expect(pace.admit(now: 2060) == 0)
    }

    @Test func anOutageIsLoggedAtItsStartOnceAMinuteAndAtItsEnd() {
        var outage = OutageLog()
        #expect(outage.succeeded(now: 5) == nil)
        #expect(outage.failed(now: 10) == 0)
        #expect(outage.failed(now: 11) == nil)
        #expect(outage.failed(now: 70) == 1)
        #expect(outage.succeeded(now: 75) == 65)
        #expect(outage.since == nil)
        // The next outage starts afresh: its first failure is logged at once.
        #expect(outage.failed(now: 80) == 0)
    }
}
