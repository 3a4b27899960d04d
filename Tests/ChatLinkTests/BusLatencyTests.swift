import Testing
import ChatLink

@Suite struct BusLatencyTests {
    private func counts(_ pairs: [Int: Int]) -> [Int] {
        (0...BusLatency.bucketBounds.count).map { pairs[$0] ?? 0 }
    }

    @Test func noRoundTripsNoQuantile() {
        #expect(BusLatency.quantile(0.5, of: counts([:])) == nil)
        #expect(BusLatency.quantile(0.5, of: []) == nil)
    }

    @Test func interpolatesWithinTheBucketAsPrometheusDoes() {
        // 10 round trips in (0.5 ms, 1 ms]: the median is half way through that bucket.
        let median = BusLatency.quantile(0.5, of: counts([1: 10]))
        #expect(median.map { abs($0 - 0.00075) < 1e-12 } == true, "\(String(describing: median))")
        // 99 fast and 1 slow: p99 is still in the fast bucket, p99.5 is not.
        let mixed = counts([0: 99, 6: 1])
        #expect(BusLatency.quantile(0.99, of: mixed)! <= BusLatency.bucketBounds[0])
        #expect(BusLatency.quantile(0.995, of: mixed)! > BusLatency.bucketBounds[5])
    }

    @Test func theInfiniteBucketAnswersTheHighestBound() {
        #expect(BusLatency.quantile(0.99, of: counts([BusLatency.bucketBounds.count: 5])) == BusLatency.bucketBounds.last)
    }

    @Test func increaseIgnoresAChildThatStartedAgain() {
        #expect(BusLatency.increase(from: [5, 5], to: [7, 5, 1]) == [2, 0, 1])
        #expect(BusLatency.increase(from: [9, 9], to: [1, 2]) == [0, 0])
    }
}
