import Testing
@testable import ChatProtocol

@Suite struct NamesTests {
    @Test(arguments: ["a", "Z", "0", "alice", "a.b-c_D9", "_", "-", ".", String(repeating: "u", count: 32)])
    func validUsers(_ name: String) {
        #expect(Names.isValidUser(name))
    }

    @Test(arguments: ["", String(repeating: "u", count: 33), "a b", "a:b", "a/b", "a@b", "é", "ü", "😀", "a\u{0}", "a\n", "a*"])
    func invalidUsers(_ name: String) {
        #expect(!Names.isValidUser(name))
    }

    @Test func userSubstring() {
        let text = "?user=alice&x"
        let start = text.index(text.startIndex, offsetBy: 6)
        let end = text.index(start, offsetBy: 5)
        #expect(Names.isValidUser(text[start..<end]))
        #expect(!Names.isValidUser(text[text.startIndex..<end]))
        #expect(!Names.isValidUser(text[start..<start]))
    }

    @Test(arguments: ["a", "live:42", "a.b-c_D:9", ":", String(repeating: "r", count: 64)])
    func validRooms(_ name: String) {
        #expect(Names.isValidRoom(name))
    }

    @Test(arguments: ["", String(repeating: "r", count: 65), "a b", "a/b", "a#b", "é", "😀", "a\u{0}", "room\t", "a*", "a,b",
                      String(repeating: "é", count: 32)])
    func invalidRooms(_ name: String) {
        #expect(!Names.isValidRoom(name))
    }
}

/// What each attempt at the given times got. (Mutating calls stay out of `#expect`,
/// which cannot decompose them.)
func attempts(_ bucket: inout TokenBucket, at times: [Double]) -> [Bool] {
    times.map { bucket.take(now: $0) }
}

func violations(_ detector: inout FloodDetector, at times: [Double]) -> [Bool] {
    times.map { detector.recordViolation(now: $0) }
}

@Suite struct TokenBucketTests {
    @Test func burstThenRefusal() {
        var bucket = TokenBucket(rate: 2, burst: 3, now: 100)
        let got = attempts(&bucket, at: [100, 100, 100, 100, 100.1])
        #expect(got == [true, true, true, false, false])
    }

    /// Made without the time: as a bucket made at the first attempt would be.
    @Test func aBucketMadeWithoutTheTimeIsFull() {
        for start in [0.0, 0.001, 5_000_000] {
            var bucket = TokenBucket(rate: 2, burst: 3)
            var timed = TokenBucket(rate: 2, burst: 3, now: start)
            let times = [start, start, start, start, start + 0.5, start + 0.5]
            #expect(attempts(&bucket, at: times) == attempts(&timed, at: times))
        }
        var still = TokenBucket(rate: 0, burst: 2)
        #expect(attempts(&still, at: [7, 7, 7]) == [true, true, false])
    }

    @Test func refillsAtTheRate() {
        var bucket = TokenBucket(rate: 2, burst: 1, now: 0)
        // 0.25 s is half a token; 0.5 s a whole one.
        let got = attempts(&bucket, at: [0, 0.25, 0.5, 0.5, 1.0])
        #expect(got == [true, false, true, false, true])
    }

    @Test func refillIsCappedAtTheBurst() {
        var bucket = TokenBucket(rate: 10, burst: 3, now: 0)
        let first = attempts(&bucket, at: [0, 0, 0, 0])
        #expect(first == [true, true, true, false])
        // An hour idle refills only up to the burst.
        let later = attempts(&bucket, at: Array(repeating: 3600, count: 10))
        #expect(later.filter { $0 }.count == 3)
        #expect(later.prefix(3).allSatisfy { $0 })
    }

    @Test func sustainedRateIsHonoured() {
        var bucket = TokenBucket(rate: 5, burst: 1, now: 0)
        // 100 attempts a second for 10 seconds.
        let got = attempts(&bucket, at: (0..<1_000).map { Double($0) / 100 })
        #expect((49...51).contains(got.filter { $0 }.count))
    }

    @Test func clockGoingBackwardsAddsNothing() {
        var bucket = TokenBucket(rate: 1, burst: 1, now: 50)
        let got = attempts(&bucket, at: [50, 10, 10.5, 11.1])
        #expect(got == [true, false, false, true])
    }
}

@Suite struct FloodDetectorTests {
    @Test func limitReachedWithinTheWindow() {
        var detector = FloodDetector(limit: 3, window: 10)
        let got = violations(&detector, at: [0, 1, 2, 3])
        #expect(got == [false, false, true, true])
    }

    @Test func oldViolationsExpire() {
        var detector = FloodDetector(limit: 3, window: 10)
        // 0 and 1 fell out by 20; 20 and 25 by 35.5.
        let got = violations(&detector, at: [0, 1, 20, 25, 29, 35.5])
        #expect(got == [false, false, false, false, true, false])
    }

    @Test func windowEdgeIsInclusive() {
        var edge = FloodDetector(limit: 3, window: 10)
        let atEdge = violations(&edge, at: [0, 5, 10])
        #expect(atEdge == [false, false, true])
        var past = FloodDetector(limit: 3, window: 10)
        let beyond = violations(&past, at: [0, 5, 10.001])
        #expect(beyond == [false, false, false])
    }

    @Test func defaultWindowIsTenSeconds() {
        var detector = FloodDetector(limit: 2)
        #expect(detector.window == 10)
        let got = violations(&detector, at: [0, 10.5, 11])
        #expect(got == [false, false, true])
    }

    @Test func limitOfOneFloodsAtOnce() {
        var detector = FloodDetector(limit: 1, window: 10)
        let got = violations(&detector, at: [0])
        #expect(got == [true])
    }
}

@Suite struct CloseCodeTests {
    @Test(arguments: [
        (ByeReason.reload, UInt16(1001)), (.shutdown, 1001), (.slowConsumer, 4000), (.flood, 4001), (.kicked, 4002),
    ])
    func forBye(_ reason: ByeReason, _ code: UInt16) {
        #expect(CloseCode.forBye(reason) == code)
    }

    @Test func codesAreTheProtocols() {
        #expect([CloseCode.normal, CloseCode.goingAway, CloseCode.protocolError, CloseCode.invalidUTF8, CloseCode.policy,
                 CloseCode.tooBig, CloseCode.slowConsumer, CloseCode.flood, CloseCode.kicked]
            == [1000, 1001, 1002, 1007, 1008, 1009, 4000, 4001, 4002])
    }
}
