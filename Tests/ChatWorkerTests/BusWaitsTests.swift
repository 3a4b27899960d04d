import NIOCore
import Testing
@testable import ChatWorker

@Suite struct BusWaitsTests {
    @Test func expiredRequestsLeaveAndTheRestGoWhenTheBusIsBack() {
        var waits = BusWaits<String>()
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        waits.add("a", until: t0 + .milliseconds(100))
        waits.add("b", until: t0 + .milliseconds(300))
        waits.add("c", until: t0 + .milliseconds(200))
        #expect(waits.takeExpired(now: t0 + .milliseconds(50)).isEmpty)
        #expect(waits.takeExpired(now: t0 + .milliseconds(200)) == ["a", "c"])
        #expect(waits.count == 1)
        #expect(waits.takeAll() == ["b"])
        #expect(waits.takeAll().isEmpty && waits.takeExpired(now: t0 + .seconds(9)).isEmpty)
    }
}
