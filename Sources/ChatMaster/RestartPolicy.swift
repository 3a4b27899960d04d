/// When to restart a child slot after its child ended: exponential backoff over
/// consecutive short-lived runs, forgiven once a child stays up long enough.
/// Pure logic: time comes in as seconds since an arbitrary origin.
public struct RestartPolicy: Sendable, Equatable {
    public struct Settings: Sendable, Equatable {
        public var initialDelay: Double
        public var maximumDelay: Double
        public var stableAfter: Double
        public var crashLoopAfter: Int

        public init(initialDelay: Double, maximumDelay: Double, stableAfter: Double, crashLoopAfter: Int) {
            self.initialDelay = initialDelay
            self.maximumDelay = maximumDelay
            self.stableAfter = stableAfter
            self.crashLoopAfter = crashLoopAfter
        }
    }

    /// Replaced on a reload; the slot's history (failures in a row, restarts) stays.
    public var settings: Settings
    /// Exits in a row, each before the child had been up `stableAfter` seconds.
    public private(set) var consecutiveFailures = 0
    /// Restarts so far over the slot's whole life, for status displays.
    public private(set) var totalRestarts = 0

    public init(settings: Settings) {
        self.settings = settings
    }

    /// A slot is crash-looping once it failed `crashLoopAfter` times in a row.
    public var isCrashLooping: Bool { consecutiveFailures >= settings.crashLoopAfter }

    /// Records an exit after `uptime` seconds; returns the delay before the next start.
    public mutating func recordExit(uptime: Double) -> Double {
        totalRestarts += 1
        if uptime >= settings.stableAfter {
            consecutiveFailures = 0
        }
        consecutiveFailures += 1
        return delay(afterFailures: consecutiveFailures)
    }

    /// A child that has run `stableAfter` seconds clears the slot's history.
    public mutating func recordStable() {
        consecutiveFailures = 0
    }

    private func delay(afterFailures failures: Int) -> Double {
        let exponent = Double(min(failures - 1, 30))
        return min(settings.maximumDelay, settings.initialDelay * pow2(exponent))
    }

    private func pow2(_ exponent: Double) -> Double {
        var result = 1.0
        for _ in 0..<Int(exponent) { result *= 2 }
        return result
    }
}
