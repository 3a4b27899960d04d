import Histogram

/// Latency histograms are in microseconds, up to a minute (larger values are clamped).
typealias Latency = Histogram<UInt64>

enum LatencyHist {
    static let highest: UInt64 = 60_000_000

    static func make() -> Latency {
        Latency(lowestDiscernibleValue: 1, highestTrackableValue: highest, numberOfSignificantValueDigits: .three)
    }

    @inline(__always)
    static func record(_ h: inout Latency, nanos: UInt64) {
        var us = nanos / 1_000
        if us == 0 { us = 1 }
        if us > highest { us = highest }
        h.record(us)
    }
}

/// Everything a load generator counts. One per event loop, touched only on that loop;
/// copied out for progress and reports and summed across loops and processes.
struct Counters: Codable {
    var connectAttempts = 0
    var connectFailures = 0
    var handshakes = 0
    var handshakeFailures = 0
    var hellos = 0
    var joins = 0
    var joinFailures = 0
    /// Connections whose setup (handshake, hello, join) finished, well or not.
    var setupsDone = 0
    var setupTimeouts = 0
    var open = 0
    var sent = 0
    /// Room messages received with a new seq (duplicates excluded).
    var deliveries = 0
    var duplicates = 0
    /// Seqs skipped within a member's stream.
    var holes = 0
    /// A publisher's counter going backwards at a receiver.
    var orderViolations = 0
    var gaps = 0
    var errors = 0
    var byes = 0
    var unexpectedCloses = 0
    var cycles = 0
    var cycleFailures = 0
    var pingsAnswered = 0
    var unparsed = 0

    static func + (a: Counters, b: Counters) -> Counters {
        var r = a
        r.connectAttempts += b.connectAttempts
        r.connectFailures += b.connectFailures
        r.handshakes += b.handshakes
        r.handshakeFailures += b.handshakeFailures
        r.hellos += b.hellos
        r.joins += b.joins
        r.joinFailures += b.joinFailures
        r.setupsDone += b.setupsDone
        r.setupTimeouts += b.setupTimeouts
        r.open += b.open
        r.sent += b.sent
        r.deliveries += b.deliveries
        r.duplicates += b.duplicates
        r.holes += b.holes
        r.orderViolations += b.orderViolations
        r.gaps += b.gaps
        r.errors += b.errors
        r.byes += b.byes
        r.unexpectedCloses += b.unexpectedCloses
        r.cycles += b.cycles
        r.cycleFailures += b.cycleFailures
        r.pingsAnswered += b.pingsAnswered
        r.unparsed += b.unparsed
        return r
    }

    /// Counters that describe a phase rather than a state (everything but `open`) start over.
    mutating func resetForPhase() {
        let open = self.open
        self = Counters()
        self.open = open
    }
}

/// What one phase produced in one process (or, merged, in all of them).
struct PhaseReport: Codable {
    var counters = Counters()
    /// Send-to-receipt latency of room messages.
    var latency = LatencyHist.make()
    /// Connect start to `101 Switching Protocols`.
    var handshake = LatencyHist.make()
    /// Connect start to the end of setup (hello, or joined).
    var setup = LatencyHist.make()
    /// Churn: connect to closed, through join and leave.
    var cycle = LatencyHist.make()
    var roomMembers: [Int] = []
    var roomSent: [Int] = []
    var roomReceived: [Int] = []
    /// Deliveries counted while publishers were still sending (the rest arrived in the drain).
    var windowDeliveries = 0
    var windowSent = 0
    /// First connect to last setup (setup phases); the publishing window (steps).
    var elapsedNs: UInt64 = 0
    var drainNs: UInt64 = 0
    /// The step was cut short: its p99 passed the abort limit (`Engine.step`).
    var aborted = false
    var clientCPUMicros = 0
    /// The kernel's part of `clientCPUMicros` (stime).
    var clientSystemMicros = 0
    var clientRSSKB = 0
    var errorKinds: [String: Int] = [:]
    var processes = 1
    /// `--stalled`: per room, members that stopped reading in this phase (from then on they
    /// are not in `roomMembers`, and nothing they receive is counted).
    var roomStalled: [Int] = []
    /// Members that stopped reading so far, and of them those whose connection was seen
    /// ended by the server (a close frame, or the TCP connection closed).
    var stalledMembers = 0
    var stalledGone = 0
    /// How the stalled members' connections ended: "close 4000", "bye slow_consumer", ...
    var stalledKinds: [String: Int] = [:]

    mutating func merge(_ o: PhaseReport) {
        counters = counters + o.counters
        latency.add(o.latency)
        handshake.add(o.handshake)
        setup.add(o.setup)
        cycle.add(o.cycle)
        roomMembers = Self.sum(roomMembers, o.roomMembers)
        roomSent = Self.sum(roomSent, o.roomSent)
        roomReceived = Self.sum(roomReceived, o.roomReceived)
        windowDeliveries += o.windowDeliveries
        windowSent += o.windowSent
        elapsedNs = max(elapsedNs, o.elapsedNs)
        drainNs = max(drainNs, o.drainNs)
        aborted = aborted || o.aborted
        clientCPUMicros += o.clientCPUMicros
        clientSystemMicros += o.clientSystemMicros
        clientRSSKB += o.clientRSSKB
        for (k, v) in o.errorKinds { errorKinds[k, default: 0] += v }
        processes += o.processes
        roomStalled = Self.sum(roomStalled, o.roomStalled)
        stalledMembers += o.stalledMembers
        stalledGone += o.stalledGone
        for (k, v) in o.stalledKinds { stalledKinds[k, default: 0] += v }
    }

    /// This process's CPU (its CPU clock, and stime alone) since `start`.
    mutating func noteClientCPU(since start: (total: Int, system: Int)) {
        let now = Proc.selfCPUSplit()
        clientCPUMicros = now.total - start.total
        clientSystemMicros = min(now.system - start.system, clientCPUMicros)  // stime: ticks
    }

    static func merged(_ reports: [PhaseReport]) -> PhaseReport {
        guard var first = reports.first else { return PhaseReport() }
        for r in reports.dropFirst() { first.merge(r) }
        return first
    }

    private static func sum(_ a: [Int], _ b: [Int]) -> [Int] {
        var r = a.count >= b.count ? a : b
        let other = a.count >= b.count ? b : a
        for (i, v) in other.enumerated() { r[i] += v }
        return r
    }
}

/// A one-second view for the live progress line.
struct Progress: Codable {
    var counters = Counters()
    var p99us: UInt64 = 0
}

/// Percentiles of a latency histogram in milliseconds, for reports.
struct LatencySummary: Codable {
    var count: UInt64
    var p50ms: Double
    var p90ms: Double
    var p99ms: Double
    var p999ms: Double
    var maxMs: Double
    var meanMs: Double

    init(_ h: Latency) {
        count = h.totalCount
        func ms(_ us: UInt64) -> Double { (Double(us) / 1000.0 * 1000).rounded() / 1000 }
        if h.totalCount == 0 {
            p50ms = 0; p90ms = 0; p99ms = 0; p999ms = 0; maxMs = 0; meanMs = 0
        } else {
            p50ms = ms(h.valueAtPercentile(50))
            p90ms = ms(h.valueAtPercentile(90))
            p99ms = ms(h.valueAtPercentile(99))
            p999ms = ms(h.valueAtPercentile(99.9))
            maxMs = ms(h.max)
            meanMs = (h.mean / 1000.0 * 1000).rounded() / 1000
        }
    }

    var text: String {
        count == 0 ? "none" : "p50 \(fmt(p50ms)) p90 \(fmt(p90ms)) p99 \(fmt(p99ms)) p99.9 \(fmt(p999ms)) max \(fmt(maxMs)) ms (n=\(count))"
    }
}

func fmt(_ v: Double, _ digits: Int = 2) -> String {
    if v.isNaN || v.isInfinite { return "-" }
    var p = 1.0
    for _ in 0..<digits { p *= 10 }
    let r = (v * p).rounded() / p
    var s = "\(r)"
    if s.hasSuffix(".0") { s.removeLast(2) }
    return s
}

/// 12345 -> "12.3K", for progress lines.
func short(_ v: Double) -> String {
    if v >= 1_000_000 { return fmt(v / 1_000_000, 2) + "M" }
    if v >= 10_000 { return fmt(v / 1_000, 1) + "K" }
    return fmt(v, 0)
}
