#if canImport(Glibc)
import Glibc
#endif
import CChatEngine
import Dispatch
import Foundation
import NIOConcurrencyHelpers

/// What one chatbench process needs to know to play its part (sent to child processes as JSON).
struct Spec: Codable {
    var host: String
    var port: Int
    var path: String
    /// Source addresses to bind client sockets to (empty: let the kernel pick 127.0.0.1).
    var sources: [String]
    var userPrefix: String
    var roomPrefix: String
    var rooms: Int
    var publishers: Int
    var textBytes: Int
    var threads: Int
    /// Setups in flight at once, in this process.
    var concurrency: Int
    var connectTimeoutMs: Int
    /// This process's share: global indices i with i % processCount == processIndex.
    var processIndex: Int
    var processCount: Int
    /// Speak nginx+nchan's endpoints instead of chatgw's protocol: members subscribe with a
    /// WebSocket to `path?room=R`, publishers send bare text frames on a WebSocket of their own
    /// to `pubPath?room=R`, and members parse that text (there is no envelope and no seq).
    var nchan = false
    var pubPath = "/pub"
    /// `--transport sse`: members other than publishers open `ssePath?rooms=R&user=U`, an event
    /// stream, instead of a WebSocket (publishers stay WebSocket members and `send`).
    var sse = false
    var ssePath = "/sse"
    /// `--join-in-url`: WebSocket members join their room by `path?rooms=R` (no `join` frame).
    var joinInURL = false
    /// `--stalled`: members stalledFrom..<stalledFrom + stalledCount stop reading when the first step starts.
    var stalledFrom = 0
    var stalledCount = 0

    func isStalled(_ index: Int) -> Bool {
        stalledCount > 0 && index >= stalledFrom && index < stalledFrom + stalledCount
    }

    /// nchan: publisher p's own connection is opened as index `nchanPublisherBase + p`.
    static let nchanPublisherBase = 40_000_000

    func roomName(_ r: Int) -> String { "\(roomPrefix)\(r)" }

    /// Publishers of room r: global ids p < publishers with p % rooms == r.
    func publisherSlots(room r: Int) -> Int {
        r < publishers ? (publishers - r + rooms - 1) / rooms : 0
    }
}

/// One event loop's share of the connections and everything they count. Only touched on
/// its loop's thread: not Sendable; the orchestrator reaches it through tasks posted to the
/// loop (`Engine.onAll`).
final class LoopShard {
    let id: Int
    let loop: BenchLoop
    let spec: Spec
    let target: SocketTarget
    let sourceAddresses: [sockaddr_in]
    /// What every request line and head share: `?room=` or `?user=` values are written between.
    let roomNames: [[UInt8]]
    let requestTail: [UInt8]
    let joinRequests: [[UInt8]]
    let leaveRequests: [[UInt8]]
    let sendPrefixes: [[UInt8]]

    var counters = Counters()
    var latency = LatencyHist.make()
    var handshake = LatencyHist.make()
    var setup = LatencyHist.make()
    var cycle = LatencyHist.make()
    var members: [Int]
    var roomSent: [Int]
    var roomReceived: [Int]
    var errorKinds: [String: Int] = [:]
    /// `--stalled`: per room, members that stopped reading in this phase; how their connections ended.
    var roomStalled: [Int]
    var stalledKinds: [String: Int] = [:]
    /// Receive time of the read being processed (one clock read per read, not per message).
    var nowNs: UInt64 = 0
    var scratch: [UInt8] = []
    var stopping = false

    private(set) var connectionCount = 0
    private var publishers: [BenchConnection] = []
    /// `--stalled`: members due to stop reading at the first step, then those that did.
    private var stallCandidates: [BenchConnection] = []
    private var stalled: [BenchConnection] = []

    // Launching.
    private var pending: [Int] = []
    private var pendingPos = 0
    private var mode = Mode.member
    private var inflight = 0
    private var maxInflight = 1
    private var ratePerSecond: Double?
    private var rateStart: UInt64 = 0
    private var launched = 0
    private var launchTicker: Int?
    private(set) var firstStart: UInt64 = 0
    private(set) var lastDone: UInt64 = 0

    // Publishing.
    private var publishTask: Int?
    private var publishStart: UInt64 = 0
    private var ratePerPublisher = 0.0

    init(id: Int, loop: BenchLoop, spec: Spec) throws {
        self.id = id
        self.loop = loop
        self.spec = spec
        target = try SocketTarget(host: spec.host, port: spec.port)
        sourceAddresses = try spec.sources.map { try SocketTarget.ipv4($0, port: 0) }
        roomNames = (0..<spec.rooms).map { Array(spec.roomName($0).utf8) }
        requestTail = Array(" HTTP/1.1\r\nHost: \(spec.host):\(spec.port)\r\n".utf8)
        joinRequests = (0..<spec.rooms).map { Array("{\"type\":\"join\",\"room\":\"\(spec.roomName($0))\"}".utf8) }
        leaveRequests = (0..<spec.rooms).map { Array("{\"type\":\"leave\",\"room\":\"\(spec.roomName($0))\"}".utf8) }
        sendPrefixes = (0..<spec.rooms).map { Array("{\"type\":\"send\",\"room\":\"\(spec.roomName($0))\",\"text\":\"t=".utf8) }
        members = [Int](repeating: 0, count: spec.rooms)
        roomSent = members
        roomReceived = members
        roomStalled = members
        scratch.reserveCapacity(256 + spec.textBytes)
    }

    func noteError(_ kind: String) {
        if errorKinds.count < 50 || errorKinds[kind] != nil { errorKinds[kind, default: 0] += 1 }
    }

    func noteStalled(_ kind: String) {
        if stalledKinds.count < 50 || stalledKinds[kind] != nil { stalledKinds[kind, default: 0] += 1 }
    }

    func resetPhase() {
        roomStalled = [Int](repeating: 0, count: spec.rooms)
        counters.resetForPhase()
        latency.reset()
        handshake.reset()
        setup.reset()
        cycle.reset()
        roomSent = [Int](repeating: 0, count: spec.rooms)
        roomReceived = roomSent
        errorKinds = [:]
        firstStart = 0
        lastDone = 0
        for p in publishers { p.stepSent = 0 }
    }

    // MARK: opening connections

    /// Opens `indices` with at most `maxInflight` setups at a time, and at most
    /// `rate` new connections per second when given.
    func start(indices: [Int], mode: Mode, maxInflight: Int, rate: Double?) {
        pending = indices
        pendingPos = 0
        self.mode = mode
        self.maxInflight = max(1, maxInflight)
        ratePerSecond = rate
        rateStart = monotonicNanos()
        launched = 0
        if rate != nil {
            launchTicker = loop.every(2_000_000, first: monotonicNanos()) { [unowned self] in launchMore() }
        } else {
            launchMore()
        }
    }

    /// All launched and every setup finished.
    var setupComplete: Bool { pendingPos >= pending.count && inflight == 0 }
    var unfinishedSetups: Int { (pending.count - pendingPos) + inflight }

    func stopLaunching() {
        if let launchTicker { loop.cancel(launchTicker) }
        launchTicker = nil
        pending.removeAll()
        pendingPos = 0
    }

    private func launchMore() {
        var allowed = Int.max
        if let rate = ratePerSecond {
            allowed = Int(Double(monotonicNanos() &- rateStart) * rate / 1e9) + 1 - launched
        }
        while inflight < maxInflight && pendingPos < pending.count && allowed > 0 {
            let index = pending[pendingPos]
            pendingPos += 1
            allowed -= 1
            open(index)
        }
        if pendingPos >= pending.count, let ticker = launchTicker {
            loop.cancel(ticker)
            launchTicker = nil
        }
    }

    private func open(_ index: Int) {
        inflight += 1
        launched += 1
        counters.connectAttempts += 1
        // nchan: members only subscribe; publisher p gets a connection of its own (index base + p).
        let nchanPublisher = spec.nchan && mode == .member && index >= Spec.nchanPublisherBase
        let logical = nchanPublisher ? index - Spec.nchanPublisherBase : index
        let room = logical % spec.rooms
        let isPublisher = mode == .member && logical < spec.publishers && (nchanPublisher || !spec.nchan)
        let conn = BenchConnection(index: index, room: room, mode: mode, publisherID: isPublisher ? logical : -1,
                                   publisherSlots: mode == .member && !nchanPublisher ? spec.publisherSlots(room: room) : 0,
                                   publishOnly: nchanPublisher, shard: self)
        connectionCount += 1
        if isPublisher { publishers.append(conn) }
        if mode == .member && !isPublisher && !nchanPublisher && spec.isStalled(index) { stallCandidates.append(conn) }
        conn.startNs = monotonicNanos()
        if firstStart == 0 { firstStart = conn.startNs }
        let source = sourceAddresses.isEmpty ? nil : sourceAddresses[(index / max(1, spec.processCount)) % sourceAddresses.count]
        switch Self.connectSocket(to: target, from: source, noDelay: conn.writesOften) {
        case .success(let fd):
            guard loop.add(fd, conn) else {
                close(fd)
                connectionClosedUnconnected(conn)
                conn.connectFailed("descriptor \(fd) beyond the loop's table")
                return
            }
            conn.connecting(fd: fd)
            loop.watchConnect(conn, due: conn.startNs &+ UInt64(spec.connectTimeoutMs) * 1_000_000)
        case .failure(let error):
            connectionClosedUnconnected(conn)
            conn.connectFailed(error.text)
        }
    }

    /// A connection that never connected is gone.
    func connectionClosedUnconnected(_ conn: BenchConnection) {
        connectionCount -= 1
        if conn.publisherID >= 0 { publishers.removeAll { $0 === conn } }
    }

    /// A failed system call: what it was and strerror, for the error kinds.
    struct SysError: Error {
        let text: String
        init(_ call: String, _ code: Int32) { text = "\(call): \(String(cString: strerror(code)))" }
    }

    /// A non-blocking socket with its connect started: socket, the options it needs (no
    /// delay only for connections that write often, a source address when given, with the
    /// port left to connect()), connect.
    private static func connectSocket(to target: SocketTarget, from source: sockaddr_in?, noDelay: Bool) -> Result<Int32, SysError> {
        let fd = socket(target.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(SysError("socket", errno)) }
        var one: Int32 = 1
        if noDelay { _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4) }
        if var source {
            // Defer the port choice to connect(), so a source address's ports are shared by destinations.
            _ = setsockopt(fd, Int32(IPPROTO_IP), 24 /* IP_BIND_ADDRESS_NO_PORT */, &one, 4)
            let r = withUnsafePointer(to: &source) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if r != 0 {
                let e = errno
                close(fd)
                return .failure(SysError("bind", e))
            }
        }
        let r = target.withSockaddr { connect(fd, $0, $1) }
        if r != 0 && errno != EINPROGRESS {
            let e = errno
            close(fd)
            return .failure(SysError("connect", e))
        }
        return .success(fd)
    }

    /// A setup (or churn cycle) ended: frees a slot, opens the next.
    func setupFinished(ok: Bool, now: UInt64, started: UInt64) {
        inflight -= 1
        counters.setupsDone += 1
        if ok && mode != .churn {
            LatencyHist.record(&setup, nanos: now &- started)
        }
        if now > lastDone { lastDone = now }
        launchMore()
    }

    func connectionClosed(_ conn: BenchConnection) {
        connectionCount -= 1
        if conn.publisherID >= 0 { publishers.removeAll { $0 === conn } }
    }

    /// Closes every connection (TCP FIN; the server sees the peer go away).
    func closeAll() {
        stopping = true
        stopLaunching()
        stopPublishing()
        for fd in 0...Int(loop.highestFd) {
            if let conn = loop.table[fd] { conn.close() }
        }
    }

    // MARK: stalled members

    /// The first time (the first step's start): the stall candidates that are open and
    /// joined stop reading.
    func stallMembers() {
        let candidates = stallCandidates
        stallCandidates = []
        for conn in candidates where conn.stall() {
            stalled.append(conn)
            roomStalled[conn.room] += 1
        }
    }

    /// The end of the run: the stalled members read again, to find what the server did.
    func resumeStalled() {
        for conn in stalled { conn.resumeReading() }
    }

    /// Some stalled member's connection is not known to be ended yet.
    var stalledUndecided: Bool { stalled.contains { !$0.gone } }

    // MARK: publishing

    /// Every local publisher sends `perPublisher` messages per second, from `start` on, with
    /// their send times spread evenly over the period.
    func startPublishing(perPublisher: Double, start: UInt64) {
        ratePerPublisher = perPublisher
        publishStart = start
        for p in publishers { p.stepSent = 0 }
        guard !publishers.isEmpty, perPublisher > 0 else { return }
        publishTask = loop.every(2_000_000, first: monotonicNanos() + 1_000_000) { [unowned self] in publishTick() }
    }

    func stopPublishing() {
        if let publishTask { loop.cancel(publishTask) }
        publishTask = nil
    }

    private func publishTick() {
        let now = monotonicNanos()
        guard now > publishStart else { return }
        let elapsed = Double(now - publishStart) / 1e9
        let total = Double(spec.publishers)
        for p in publishers where p.isOpen {
            let offset = Double(p.publisherID) / total
            let due = min(Int(elapsed * ratePerPublisher + offset) - p.stepSent, 200)
            if due <= 0 { continue }
            for _ in 0..<due { p.publish(now: monotonicNanos()) }
            p.flush()
        }
    }

    var publisherCount: Int { publishers.count }

    // MARK: reports

    func progress() -> (Counters, Latency) { (counters, latency) }

    func report() -> PhaseReport {
        var r = PhaseReport()
        r.counters = counters
        r.latency = latency
        r.handshake = handshake
        r.setup = setup
        r.cycle = cycle
        r.roomMembers = members
        r.roomSent = roomSent
        r.roomReceived = roomReceived
        r.errorKinds = errorKinds
        r.roomStalled = roomStalled
        r.stalledMembers = stalled.count
        r.stalledGone = stalled.reduce(0) { $0 + ($1.gone ? 1 : 0) }
        r.stalledKinds = stalledKinds
        r.elapsedNs = firstStart > 0 && lastDone > firstStart ? lastDone - firstStart : 0
        return r
    }
}

/// One loop thread: its shard (touched only on that thread once it runs) and the inbox
/// through which the orchestrator reaches it.
final class ShardRunner: @unchecked Sendable {
    let inbox: LoopInbox
    /// Confined to `thread` from `start()` on (built before it, on the caller's thread).
    private let shard: LoopShard
    private let finished = DispatchSemaphore(value: 0)

    init(id: Int, spec: Spec) throws {
        inbox = LoopInbox()
        shard = try LoopShard(id: id, loop: BenchLoop(inbox: inbox), spec: spec)
    }

    func start() {
        let thread = Thread { [self] in
            shard.loop.run(shard)
            finished.signal()
        }
        thread.name = "chatbench-loop-\(shard.id)"
        thread.start()
    }

    /// Runs `task` on the loop's thread, soon.
    func post(_ task: @escaping @Sendable (LoopShard) -> Void) { inbox.post(task) }

    /// Ends the loop (its remaining sockets are closed) and waits for its thread.
    func stop() {
        post { $0.loop.stopped = true }
        finished.wait()
    }
}

/// One process's load generator: a loop thread (one or two) and a shard per loop.
final class Engine {
    let spec: Spec
    /// One shard per loop, each usable only on its loop (`onAll`, or `post`).
    let shards: [ShardRunner]
    /// Called about once a second while a phase runs.
    var onProgress: ((Progress) -> Void)?

    struct SetupError: Error, CustomStringConvertible {
        let description: String
        init(_ text: String) { description = text }
    }

    init(spec: Spec) throws {
        self.spec = spec
        // Before the shards' threads: a table grown connection by connection would stall
        // this process's connects now and then, as a worker's accepts (the gateway does the same).
        _ = chatengine_reserve_descriptors(65536)
        shards = try (0..<max(1, spec.threads)).map { try ShardRunner(id: $0, spec: spec) }
        for shard in shards { shard.start() }
    }

    func shutdown() {
        for shard in shards { shard.stop() }
    }

    /// A step is not cut short before this: its first second's p99 says little.
    static let minAbortSeconds = 2.0

    /// Runs `body` on every shard's loop and waits for all answers.
    func onAll<T: Sendable>(_ body: @escaping @Sendable (LoopShard) -> T) -> [T] {
        let results = NIOLockedValueBox<[T?]>(Array(repeating: nil, count: shards.count))
        let done = DispatchSemaphore(value: 0)
        for (i, shard) in shards.enumerated() {
            shard.post { s in
                let value = body(s)
                results.withLockedValue { $0[i] = value }
                done.signal()
            }
        }
        for _ in shards { done.wait() }
        return results.withLockedValue { $0.map { $0! } }
    }

    private func snapshot() -> Progress {
        let parts = onAll { $0.progress() }
        var merged = Progress()
        var hist = LatencyHist.make()
        for (c, h) in parts {
            merged.counters = merged.counters + c
            hist.add(h)
        }
        merged.p99us = hist.totalCount > 0 ? hist.valueAtPercentile(99) : 0
        return merged
    }

    private func gather() -> PhaseReport {
        let reports = onAll { $0.report() }
        var merged = PhaseReport.merged(reports)
        merged.processes = 1
        return merged
    }

    /// Waits, reporting progress once a second, until `done` or the deadline; or until
    /// `giveUp` says yes to a progress snapshot (returns true then).
    @discardableResult
    private func wait(seconds: Double, pollMs: Int = 50, until done: () -> Bool = { false },
                      giveUp: ((Progress) -> Bool)? = nil) -> Bool {
        let start = monotonicNanos()
        var lastProgress = start
        while true {
            let now = monotonicNanos()
            if Double(now - start) / 1e9 >= seconds { return false }
            if done() { return false }
            if now - lastProgress >= 1_000_000_000 {
                lastProgress = now
                let progress = snapshot()
                onProgress?(progress)
                if let giveUp, giveUp(progress) { return true }
            }
            sleepMillis(pollMs)
        }
    }

    /// This process's part of `0..<total`, dealt to the loops.
    private func split(_ total: Int) -> [[Int]] {
        var parts = [[Int]](repeating: [], count: shards.count)
        var k = 0
        var i = spec.processIndex
        while i < total {
            parts[k % shards.count].append(i)
            k += 1
            i += spec.processCount
        }
        return parts
    }

    // MARK: phases

    /// Opens this process's share of `total` connections (joining rooms for `.member`),
    /// with bounded concurrency; waits until every setup ended or `timeout`.
    func setup(total: Int, mode: Mode, timeout: Double) -> PhaseReport {
        _ = onAll { $0.resetPhase(); $0.stopping = false }
        let cpu0 = Proc.selfCPUSplit()
        var parts = split(total)
        if spec.nchan && mode == .member {
            // The publishers' own connections, after the members (so every subscriber is there first).
            for (k, extra) in split(spec.publishers).enumerated() { parts[k] += extra.map { Spec.nchanPublisherBase + $0 } }
        }
        let perLoop = max(1, spec.concurrency / shards.count)
        for (shard, indices) in zip(shards, parts) {
            shard.post { $0.start(indices: indices, mode: mode, maxInflight: perLoop, rate: nil) }
        }
        wait(seconds: timeout) { onAll { $0.setupComplete }.allSatisfy { $0 } }
        let unfinished = onAll { s -> Int in
            let n = s.unfinishedSetups
            s.counters.setupTimeouts += n
            s.stopLaunching()
            return n
        }
        _ = unfinished
        onProgress?(snapshot())
        var report = gather()
        report.noteClientCPU(since: cpu0)
        report.clientRSSKB = Proc.memoryKB(0)?.rss ?? 0
        return report
    }

    /// Publishes at `rate` messages per second in all (shared by every publisher of every
    /// process) for `seconds`, then waits for the tail to arrive. With `abortP99Ms` > 0
    /// publishing stops once, after `minAbortSeconds`, the p99 so far passes it: the backlog
    /// of a rate the server cannot carry only grows. The tail is waited for as in any step,
    /// so that what the step calls lost is lost, not cut off.
    func step(rate: Double, seconds: Double, drainMax: Double, abortP99Ms: Double = 0) -> PhaseReport {
        _ = onAll { $0.resetPhase() }
        if spec.stalledCount > 0 { _ = onAll { $0.stallMembers() } }
        let cpu0 = Proc.selfCPUSplit()
        let perPublisher = spec.publishers > 0 ? rate / Double(spec.publishers) : 0
        let start = monotonicNanos() + 2_000_000
        _ = onAll { $0.startPublishing(perPublisher: perPublisher, start: start) }
        let giveUp: ((Progress) -> Bool)? = abortP99Ms <= 0 ? nil : { progress in
            Double(monotonicNanos() &- start) / 1e9 >= Self.minAbortSeconds && Double(progress.p99us) / 1000 > abortP99Ms
        }
        let aborted = wait(seconds: seconds + 0.002, giveUp: giveUp)
        _ = onAll { $0.stopPublishing() }
        let windowEnd = monotonicNanos()
        let atWindowEnd = onAll { ($0.counters.deliveries, $0.counters.sent) }
        // Drain: until nothing new arrived for a second, or drainMax.
        var last = -1
        var quietSince = monotonicNanos()
        wait(seconds: drainMax, pollMs: 100) {
            let now = self.onAll { $0.counters.deliveries }.reduce(0, +)
            if now != last {
                last = now
                quietSince = monotonicNanos()
                return false
            }
            return monotonicNanos() - quietSince >= 1_000_000_000
        }
        let drainEnd = monotonicNanos()
        onProgress?(snapshot())
        var report = gather()
        report.windowDeliveries = atWindowEnd.reduce(0) { $0 + $1.0 }
        report.windowSent = atWindowEnd.reduce(0) { $0 + $1.1 }
        report.elapsedNs = windowEnd - start
        report.aborted = aborted
        report.drainNs = drainEnd > windowEnd + 1_000_000_000 ? drainEnd - windowEnd - 1_000_000_000 : 0
        report.noteClientCPU(since: cpu0)
        report.clientRSSKB = Proc.memoryKB(0)?.rss ?? 0
        return report
    }

    /// Churn: `rate` cycles per second in all (connect, hello, join, leave, close) for
    /// `seconds`, at most `spec.concurrency` in flight; then waits for the last cycles.
    func churn(rate: Double, seconds: Double) -> PhaseReport {
        _ = onAll { $0.resetPhase(); $0.stopping = false }
        let cpu0 = Proc.selfCPUSplit()
        let total = Int(rate * seconds)
        // Indices above the members' range: user names that cannot collide with theirs.
        let parts = split(total).map { $0.map { 50_000_000 + $0 } }
        let perLoopRate = rate / Double(spec.processCount * shards.count)
        let perLoop = max(1, spec.concurrency / shards.count)
        for (shard, indices) in zip(shards, parts) {
            shard.post { $0.start(indices: indices, mode: .churn, maxInflight: perLoop, rate: perLoopRate) }
        }
        wait(seconds: seconds + 15) { self.onAll { $0.setupComplete }.allSatisfy { $0 } }
        _ = onAll { s -> Int in
            let n = s.unfinishedSetups
            s.counters.setupTimeouts += n
            s.stopLaunching()
            return n
        }
        onProgress?(snapshot())
        var report = gather()
        report.noteClientCPU(since: cpu0)
        report.clientRSSKB = Proc.memoryKB(0)?.rss ?? 0
        return report
    }

    /// Idle: keeps the connections for `seconds`; the report's counters say how many are
    /// still open and what the server closed or sent (`bye`) meanwhile.
    func hold(seconds: Double) -> PhaseReport {
        _ = onAll { $0.resetPhase() }
        wait(seconds: seconds)
        return gather()
    }

    /// `--stalled`: the stalled members read again (autoRead on) for up to `seconds`, or until
    /// every one found its connection ended; the report's stalled fields say how many did.
    func probeStalled(seconds: Double) -> PhaseReport {
        _ = onAll { $0.resetPhase(); $0.resumeStalled() }
        wait(seconds: seconds, pollMs: 50) { !self.onAll { $0.stalledUndecided }.contains(true) }
        return gather()
    }

    /// Closes every connection and waits (up to `timeout`) until they are gone.
    func closeAll(timeout: Double = 10) -> Int {
        _ = onAll { $0.closeAll() }
        wait(seconds: timeout, pollMs: 50) { self.onAll { $0.connectionCount }.reduce(0, +) == 0 }
        return onAll { $0.connectionCount }.reduce(0, +)
    }

    func connectionCount() -> Int {
        onAll { $0.connectionCount }.reduce(0, +)
    }
}
