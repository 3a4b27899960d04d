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

    /// Takes a token if there is one.
    public mutating func take(now: Double) -> Bool {
        tokens = min(burst, tokens + max(0, now - updatedAt) * rate)
        updatedAt = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
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
