/// A token bucket: `rate` tokens per second up to `burst`; each request takes one.
/// Pure logic: time comes in as seconds on a monotonic clock.
public struct TokenBucket: Sendable {
    public let rate: Double
    public let burst: Double
    private var tokens: Double
    private var updatedAt: Double

    public init(rate: Double, burst: Int, now: Double) {
        self.rate = rate
        self.burst = Double(burst)
        self.tokens = Double(burst)
        self.updatedAt = now
    }

    /// Full, with no reading of the clock: a full bucket stays full whatever time passed
    /// (what it gains is capped at `burst`), so any past instant of the monotonic clock
    /// (which starts at 0) will do. Every connection makes one.
    public init(rate: Double, burst: Int) {
        self.init(rate: rate, burst: burst, now: 0)
    }

    /// Takes a token if there is one.
    public mutating func take(now: Double) -> Bool {
        tokens = min(burst, tokens + max(0, now - updatedAt) * rate)
        updatedAt = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }

    /// Whether the bucket would hold `burst` tokens at `now`: as good as a new one.
    public func isFull(now: Double) -> Bool {
        tokens + max(0, now - updatedAt) * rate >= burst
    }
}

/// Counts rate-limit violations in a sliding window; too many make a flood.
public struct FloodDetector: Sendable {
    public let limit: Int
    public let window: Double
    private var violations: [Double] = []

    public init(limit: Int, window: Double = 10) {
        self.limit = limit
        self.window = window
    }

    /// Records a violation; true when the connection is flooding.
    public mutating func recordViolation(now: Double) -> Bool {
        violations.append(now)
        let cutoff = now - window
        if let first = violations.first, first < cutoff {
            violations.removeFirst(violations.prefix { $0 < cutoff }.count)
        }
        return violations.count >= limit
    }
}

/// Token buckets by key (a user's sends over HTTP, which arrive on connections of their
/// own, so no connection can hold the bucket), at most `capacity` of them. A bucket that
/// has refilled to `burst` is the same as a new one, so a full table first forgets those;
/// if every bucket is still in use, it forgets one anyway: that key starts over with a
/// fresh burst. The limit then loosens for a few keys rather than refusing a newcomer who
/// did nothing wrong, and memory stays bounded whatever the number of keys.
public struct RateTable: Sendable {
    public let rate: Double
    public let burst: Int
    public let capacity: Int
    private var buckets: [String: TokenBucket] = [:]

    public init(rate: Double, burst: Int, capacity: Int) {
        self.rate = rate
        self.burst = burst
        self.capacity = max(1, capacity)
    }

    public var count: Int { buckets.count }

    /// Takes a token from `key`'s bucket if there is one.
    public mutating func take(_ key: String, now: Double) -> Bool {
        if buckets[key] == nil {
            if buckets.count >= capacity { forgetRefilled(now: now) }
            if buckets.count >= capacity { buckets.remove(at: buckets.startIndex) }
            buckets[key] = TokenBucket(rate: rate, burst: burst, now: now)
        }
        return buckets[key]!.take(now: now)
    }

    private mutating func forgetRefilled(now: Double) {
        buckets = buckets.filter { !$0.value.isFull(now: now) }
    }
}
