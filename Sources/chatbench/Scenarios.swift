#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation

/// A JSON object under construction (results are small; Foundation does the encoding).
typealias JSON = [String: Any]

func round3(_ v: Double) -> Double {
    guard v.isFinite else { return 0 }
    return (v * 1000).rounded() / 1000
}

extension LatencySummary {
    var json: JSON {
        ["count": Int(count), "p50_ms": p50ms, "p90_ms": p90ms, "p99_ms": p99ms, "p99_9_ms": p999ms, "max_ms": maxMs, "mean_ms": meanMs]
    }
}

/// CPU of the server's processes, of this machine, and when.
struct Sample {
    var at = monotonicNanos()
    var server: [String: Int] = [:]
    var serverSystem = 0
    var machine = Proc.machineTicks()
    var client = Proc.selfCPUMicros()

    var serverTotal: Int { server.values.reduce(0, +) }
}

/// The parent's view: finds the server, samples CPU, prints the live progress line.
final class Monitor {
    var server: ServerProcesses?
    let quiet: Bool
    var phase = "starting"
    private var lastAt: UInt64 = 0
    private var lastCounters = Counters()
    private var lastServerMicros = 0
    private var lastMachine = (busy: 0, total: 0)
    private let started = monotonicNanos()

    init(serverPid: Int32?, stateDir: String?, quiet: Bool) {
        self.quiet = quiet
        server = ServerProcesses.find(serverPid: serverPid, stateDir: stateDir)
        if serverPid != nil || stateDir != nil, server == nil {
            log("chatbench: cannot find the server's processes (pid \(serverPid.map { String($0) } ?? "-"), state dir \(stateDir ?? "-")); server CPU and memory are not reported")
        }
    }

    func sample() -> Sample {
        server?.refresh()
        var s = Sample()
        s.server = server?.cpuMicrosByRole() ?? [:]
        s.serverSystem = server?.systemMicros() ?? 0
        return s
    }

    func begin(_ phase: String) {
        self.phase = phase
        lastAt = monotonicNanos()
        lastCounters = Counters()
        lastServerMicros = server?.cpuMicros() ?? 0
        lastMachine = Proc.machineTicks()
    }

    func progress(_ p: Progress) {
        guard !quiet else { return }
        let now = monotonicNanos()
        let dt = max(0.001, Double(now - lastAt) / 1e9)
        let c = p.counters
        let srv = server?.cpuMicros() ?? 0
        let machine = Proc.machineTicks()
        let machineBusy = machine.total > lastMachine.total
            ? 100.0 * Double(machine.busy - lastMachine.busy) / Double(machine.total - lastMachine.total) : 0
        var parts = ["[\(fmt(Double(now - started) / 1e9, 0))s \(phase)]", "open \(c.open)"]
        if c.connectAttempts > 0 {
            parts.append("setups \(c.setupsDone)/\(c.connectAttempts) (+\(short(Double(c.setupsDone - lastCounters.setupsDone) / dt))/s)")
        }
        let failures = c.connectFailures + c.handshakeFailures + c.joinFailures + c.cycleFailures
        if failures > 0 { parts.append("failed \(failures)") }
        if c.sent > 0 { parts.append("sent \(short(Double(c.sent - lastCounters.sent) / dt))/s") }
        if c.deliveries > 0 {
            parts.append("deliv \(short(Double(c.deliveries - lastCounters.deliveries) / dt))/s")
            parts.append("p99 \(fmt(Double(p.p99us) / 1000, 1))ms")
        }
        if c.cycles > 0 { parts.append("cycles \(short(Double(c.cycles - lastCounters.cycles) / dt))/s") }
        let bad = c.holes + c.duplicates + c.orderViolations + c.unexpectedCloses + c.errors
        if bad > 0 { parts.append("holes \(c.holes) dup \(c.duplicates) order \(c.orderViolations) closed \(c.unexpectedCloses) errors \(c.errors)") }
        if server != nil { parts.append("srv cpu \(fmt(100 * Double(srv - lastServerMicros) / Proc.microsPerSecond / dt, 0))%") }
        parts.append("machine \(fmt(machineBusy, 0))%")
        log(parts.joined(separator: " "))
        lastAt = now
        lastCounters = c
        lastServerMicros = srv
        lastMachine = machine
    }
}

func log(_ line: String) {
    FileHandle.standardError.write((line + "\n").data(using: .utf8)!)
}

/// CPU used between two samples.
struct CPUUse {
    var seconds: Double
    var serverMicros: Int
    var serverSystemMicros: Int
    var serverByRole: [String: Int]
    var machineBusyPercent: Double
    var clientMicros: Int
    var clientSystemMicros: Int

    /// `client`: the load generator's own CPU in the phase, as its processes measured it.
    init(_ a: Sample, _ b: Sample, client: PhaseReport) {
        seconds = Double(b.at - a.at) / 1e9
        serverMicros = b.serverTotal - a.serverTotal
        // stime counts in ticks: in a short phase one tick can exceed the exact total.
        serverSystemMicros = min(b.serverSystem - a.serverSystem, serverMicros)
        var roles: [String: Int] = [:]
        for (role, t) in b.server { roles[role] = t - (a.server[role] ?? 0) }
        serverByRole = roles
        machineBusyPercent = b.machine.total > a.machine.total
            ? 100 * Double(b.machine.busy - a.machine.busy) / Double(b.machine.total - a.machine.total) : 0
        clientMicros = client.clientCPUMicros
        clientSystemMicros = client.clientSystemMicros
    }

    var serverSeconds: Double { Double(serverMicros) / Proc.microsPerSecond }
    var clientSeconds: Double { Double(clientMicros) / Proc.microsPerSecond }

    /// Microseconds of server CPU per event.
    func serverMicros(per events: Int) -> Double { events > 0 ? round3(Double(serverMicros) / Double(events)) : 0 }
    /// The kernel's part of `serverMicros` (stime).
    func serverSystemMicros(per events: Int) -> Double {
        events > 0 ? round3(Double(serverSystemMicros) / Double(events)) : 0
    }
    func clientMicros(per events: Int) -> Double { events > 0 ? round3(Double(clientMicros) / Double(events)) : 0 }
    /// The kernel's part of `clientMicros` (stime; on loopback it includes the server's TCP
    /// input for what the load generator sends, connect's SYN handling among it).
    func clientSystemMicros(per events: Int) -> Double {
        events > 0 ? round3(Double(clientSystemMicros) / Double(events)) : 0
    }

    var json: JSON {
        [
            "seconds": round3(seconds),
            "server_cpu_percent": round3(100 * serverSeconds / max(seconds, 0.001)),
            "server_sys_cpu_percent": round3(100 * Double(serverSystemMicros) / Proc.microsPerSecond / max(seconds, 0.001)),
            "server_cpu_percent_by_role": serverByRole.mapValues { round3(100 * Double($0) / Proc.microsPerSecond / max(seconds, 0.001)) },
            "client_cpu_percent": round3(100 * clientSeconds / max(seconds, 0.001)),
            "machine_busy_percent": round3(machineBusyPercent),
        ]
    }
}

/// What every scenario shares: where the server is, how the load is spread, the output.
struct Context {
    var common: CommonOptions
    var monitor: Monitor
    var spec: Spec
    var driver: Driver
    /// How busy the machine was just before the run (anything else running skews the figures).
    var busyBefore: Double

    static func make(_ common: CommonOptions, total: Int, rooms: Int, publishers: Int, textBytes: Int, stalled: Int = 0) throws -> Context {
        raiseOpenFileLimit()
        let m0 = Proc.machineTicks()
        sleepMillis(500)
        let m1 = Proc.machineTicks()
        let busyBefore = m1.total > m0.total ? 100 * Double(m1.busy - m0.busy) / Double(m1.total - m0.total) : 0
        if busyBefore > 10 {
            log("chatbench: warning: the machine was \(fmt(busyBefore, 0))% busy before the run started; something else is running")
        }
        guard let url = URLComponents(string: common.url), let host = url.host, url.scheme == "ws" else {
            throw ValidationError("--url must look like ws://HOST:PORT/ws")
        }
        guard common.proto == "chatgw" || common.proto == "nchan" else {
            throw ValidationError("--protocol: chatgw or nchan")
        }
        let nchan = common.proto == "nchan"
        guard common.transport == "websocket" || common.transport == "sse" else {
            throw ValidationError("--transport: websocket or sse")
        }
        guard common.transport == "websocket" || !nchan else { throw ValidationError("--transport sse: only --protocol chatgw") }
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let processes = common.processes ?? max(1, (total + common.perProcess - 1) / common.perProcess)
        // The kernel's search for a free ephemeral port slows as a source address fills up
        // (seen: 56 us of client CPU per connect at 10,000 on one address, 300 us at 20,000).
        let sourceCount = common.sources ?? (total > 8_000 ? (total + 7_999) / 8_000 : 0)
        var spec = Spec(
            host: host, port: url.port ?? 80, path: url.path.isEmpty ? (nchan ? "/sub" : "/ws") : url.path,
            sources: (0..<sourceCount).map { "127.0.0.\(2 + $0)" },
            userPrefix: "b\(tag)-", roomPrefix: "bench-\(tag)-", rooms: max(1, rooms), publishers: publishers,
            textBytes: textBytes, threads: common.threads, concurrency: max(1, common.concurrency / processes),
            connectTimeoutMs: common.connectTimeoutMs, processIndex: 0, processCount: processes,
            nchan: nchan, pubPath: common.nchanPubPath, sse: common.transport == "sse", ssePath: common.ssePath)
        spec.joinInURL = common.joinInURL && !nchan && common.transport == "websocket"
        spec.stalledFrom = total - stalled
        spec.stalledCount = stalled
        let monitor = Monitor(serverPid: common.serverPid, stateDir: common.stateDir, quiet: common.quiet)
        let driver: Driver = processes > 1 ? try ShardedDriver(spec: spec) : try LocalDriver(spec: spec)
        driver.onProgress = { [monitor] p in monitor.progress(p) }
        return Context(common: common, monitor: monitor, spec: spec, driver: driver, busyBefore: busyBefore)
    }

    var clientJSON: JSON {
        [
            "processes": spec.processCount, "threads_per_process": spec.threads,
            "source_addresses": spec.sources.isEmpty ? ["127.0.0.1 (kernel's choice)"] : spec.sources,
            "concurrency": spec.concurrency * spec.processCount,
        ]
    }

    var serverJSON: JSON {
        guard let server = monitor.server else { return ["found": false] }
        return ["found": true, "master_pid": Int(server.master), "processes": server.members.map { ["pid": Int($0.pid), "role": $0.role] }]
    }

    /// Prints the result: JSON on stdout with --json (summary on stderr), else the summary on stdout.
    func finish(_ result: JSON, summary: [String]) {
        var result = result
        result["machine_busy_before_percent"] = round3(busyBefore)
        result["label"] = common.label ?? ""
        result["client"] = clientJSON
        result["server"] = serverJSON
        result["target"] = common.url
        result["protocol"] = common.proto
        result["transport"] = common.transport
        driver.shutdown()
        var summary = summary
        if spec.sse {
            summary.insert("  (members by SSE, GET \(spec.ssePath)\(spec.publishers > 0 ? "; publishers by WebSocket" : ""))", at: min(1, summary.count))
        }
        let text = summary.joined(separator: "\n") + "\n"
        if common.json {
            FileHandle.standardError.write(text.data(using: .utf8)!)
            let data = try! JSONSerialization.data(withJSONObject: result, options: [.prettyPrinted, .sortedKeys])
            FileHandle.standardOutput.write(data)
            FileHandle.standardOutput.write("\n".data(using: .utf8)!)
        } else {
            FileHandle.standardOutput.write(text.data(using: .utf8)!)
        }
    }

    static func raiseOpenFileLimit() {
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        limit.rlim_cur = limit.rlim_max
        setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    }
}

/// Failures of a setup phase, by kind.
func failureJSON(_ r: PhaseReport) -> JSON {
    let c = r.counters
    return [
        "connect": c.connectFailures, "handshake": c.handshakeFailures, "join": c.joinFailures,
        "timeouts": c.setupTimeouts, "closed_by_server": c.unexpectedCloses, "errors": c.errors, "byes": c.byes,
        "kinds": r.errorKinds,
    ]
}

func totalFailures(_ r: PhaseReport) -> Int {
    let c = r.counters
    return c.connectFailures + c.handshakeFailures + c.joinFailures + c.setupTimeouts
}

func kindsText(_ r: PhaseReport) -> String {
    r.errorKinds.isEmpty ? "" : " (" + r.errorKinds.sorted { $0.value > $1.value }.prefix(5).map { "\($0.key): \($0.value)" }.joined(separator: ", ") + ")"
}

// MARK: scenarios

enum Scenarios {
    static func connect(_ ctx: Context, connections: Int) {
        let m = ctx.monitor
        m.begin("connect \(connections)")
        let s0 = m.sample()
        let r = ctx.driver.setup(total: connections, mode: .connect, timeout: 60 + Double(connections) / 500)
        let s1 = m.sample()
        let cpu = CPUUse(s0, s1, client: r)
        m.begin("closing")
        let left = ctx.driver.closeAll()
        let ok = r.counters.hellos
        let seconds = Double(r.elapsedNs) / 1e9
        let rate = seconds > 0 ? Double(ok) / seconds : 0
        let hs = LatencySummary(r.handshake), hello = LatencySummary(r.setup)
        let result: JSON = [
            "scenario": "connect",
            "params": ["connections": connections],
            "attempted": r.counters.connectAttempts, "ok": ok, "failed": totalFailures(r), "failures": failureJSON(r),
            "seconds": round3(seconds), "handshakes_per_s": round3(rate),
            "handshake_latency": hs.json, "hello_latency": hello.json,
            "server_cpu_us_per_handshake": cpu.serverMicros(per: ok),
            "server_sys_us_per_handshake": cpu.serverSystemMicros(per: ok),
            "client_cpu_us_per_handshake": cpu.clientMicros(per: ok),
            "client_sys_us_per_handshake": cpu.clientSystemMicros(per: ok),
            "cpu": cpu.json, "not_closed": left,
        ]
        ctx.finish(result, summary: [
            "connect: \(ok) of \(connections) connections in \(fmt(seconds, 2)) s = \(fmt(rate, 0)) handshakes/s, \(totalFailures(r)) failed\(kindsText(r))",
            "  handshake (connect to \(ctx.spec.sse ? "200" : "101")): \(hs.text)",
            "  to hello: \(hello.text)",
            "  server CPU \(fmt(cpu.serverMicros(per: ok), 1)) us/handshake (kernel \(fmt(cpu.serverSystemMicros(per: ok), 1))); load generator \(fmt(cpu.clientMicros(per: ok), 1)) us/handshake (kernel \(fmt(cpu.clientSystemMicros(per: ok), 1))); machine busy \(fmt(cpu.machineBusyPercent, 0))%",
        ])
    }

    static func idle(_ ctx: Context, connections: Int, rooms: Int, settle: Double, hold: Double) {
        let m = ctx.monitor
        m.server?.refresh()
        let before = m.server?.memoryByRole() ?? [:]
        m.begin("idle: opening \(connections)")
        let s0 = m.sample()
        let r = ctx.driver.setup(total: connections, mode: .member, timeout: 60 + Double(connections) / 500)
        let s1 = m.sample()
        m.begin("idle: settling")
        sleepMillis(Int(settle * 1000))
        m.server?.refresh()
        let after = m.server?.memoryByRole() ?? [:]
        let held = hold > 0 ? ctx.driver.hold(seconds: hold) : nil
        m.begin("closing")
        let left = ctx.driver.closeAll()
        let joined = r.counters.joins
        let rssBefore = before.values.reduce(0) { $0 + $1.rssKB }, rssAfter = after.values.reduce(0) { $0 + $1.rssKB }
        let pssBefore = before.values.reduce(0) { $0 + $1.pssKB }, pssAfter = after.values.reduce(0) { $0 + $1.pssKB }
        let perRSS = joined > 0 ? Double(rssAfter - rssBefore) / Double(joined) : 0
        let perPSS = joined > 0 ? Double(pssAfter - pssBefore) / Double(joined) : 0
        let clientPer = joined > 0 ? Double(r.clientRSSKB) / Double(joined) : 0
        let cpu = CPUUse(s0, s1, client: r)
        let seconds = Double(r.elapsedNs) / 1e9
        func roles(_ m: [String: MemoryKB]) -> JSON { m.mapValues { ["rss_kb": $0.rssKB, "pss_kb": $0.pssKB] } }
        var result: JSON = [
            "scenario": "idle",
            "params": ["connections": connections, "rooms": rooms, "settle_s": settle, "join_in_url": ctx.spec.joinInURL],
            "joined": joined, "failed": totalFailures(r), "failures": failureJSON(r),
            "setup_seconds": round3(seconds), "setups_per_s": round3(seconds > 0 ? Double(joined) / seconds : 0),
            "setup_latency": LatencySummary(r.setup).json,
            "server_memory_before": roles(before), "server_memory_after": roles(after),
            "server_rss_kb_per_connection": round3(perRSS), "server_pss_kb_per_connection": round3(perPSS),
            "client_rss_kb_per_connection": round3(clientPer),
            "server_cpu_us_per_setup": cpu.serverMicros(per: joined),
            "cpu": cpu.json, "not_closed": left,
        ]
        var summary = [
            "idle: \(joined) of \(connections) connections joined to \(rooms) rooms\(ctx.spec.joinInURL ? " (rooms in the URL)" : "") in \(fmt(seconds, 2)) s, \(totalFailures(r)) failed\(kindsText(r))",
        ]
        if let held {
            let c = held.counters
            result["hold"] = ["seconds": hold, "open_after": c.open, "closed_by_server": c.unexpectedCloses,
                              "byes": c.byes, "errors": c.errors]
            summary.append("  held \(fmt(hold, 0)) s: \(c.open) still open, \(c.unexpectedCloses) closed by the server, \(c.byes) byes, \(c.errors) errors")
        }
        if m.server != nil {
            summary.append("  server RSS \(rssBefore / 1024) -> \(rssAfter / 1024) MiB: \(fmt(perRSS, 2)) KB per connection (PSS \(fmt(perPSS, 2)) KB)")
            for (role, mem) in after.sorted(by: { $0.key < $1.key }) {
                summary.append("    \(role): RSS \(mem.rssKB) KB (was \(before[role]?.rssKB ?? 0))")
            }
        } else {
            summary.append("  server memory not measured (give --server-pid or --state-dir)")
        }
        summary.append("  load generator RSS \(r.clientRSSKB / 1024) MiB (\(fmt(clientPer, 2)) KB per connection, baseline included)")
        ctx.finish(result, summary: summary)
    }

    struct FanoutParams {
        /// "fanout", or the preset it runs for ("hotroom"): the result's `scenario`.
        var scenario = "fanout"
        var members: Int
        var rooms: Int
        var publishers: Int
        var rates: [Double]
        var duration: Double
        var drainMax: Double
        var p99LimitMs: Double
        /// > 0: cut a step short above this p99, and end the ramp after a step that went badly.
        var abortP99Ms = 0.0
        var stopOnFail: Bool
        var textBytes: Int
        /// Members (the last ones) that stop reading when the first step starts.
        var stalled = 0
    }

    static func fanout(_ ctx: Context, _ p: FanoutParams) {
        let m = ctx.monitor
        m.begin("fanout: opening \(p.members) members in \(p.rooms) rooms")
        let setup = ctx.driver.setup(total: p.members, mode: .member, timeout: 60 + Double(p.members) / 500)
        var members = setup.roomMembers
        let joined = members.reduce(0, +)
        var summary = [
            "fanout: \(joined) of \(p.members) members joined \(p.rooms) rooms (\(p.publishers) of them publish), \(totalFailures(setup)) failed\(kindsText(setup))",
        ]
        if p.stalled > 0 {
            // Room i % rooms; its publishers are p < publishers with p % rooms == room.
            let idle = (p.members - p.stalled..<p.members).filter { ctx.spec.publisherSlots(room: $0 % p.rooms) == 0 }.count
            if idle > 0 { log("chatbench: warning: \(idle) of the \(p.stalled) stalled members are in rooms nobody publishes to") }
        }
        // With members missing, a step measures a smaller room than asked for (or nothing at
        // all when the server is unreachable): it cannot pass.
        let everyoneJoined = joined == p.members
        var steps: [JSON] = []
        var best: Double = 0
        var bestRate: Double = 0
        for (k, rate) in p.rates.enumerated() {
            m.begin("fanout step \(k + 1)/\(p.rates.count) \(fmt(rate, 0)) msg/s")
            let s0 = m.sample()
            let r = ctx.driver.step(rate: rate, seconds: p.duration, drainMax: p.drainMax, abortP99Ms: p.abortP99Ms)
            let s1 = m.sample()
            let cpu = CPUUse(s0, s1, client: r)
            let c = r.counters
            // Members that stopped reading at the start of this step (--stalled) expect nothing.
            for room in 0..<min(members.count, r.roomStalled.count) { members[room] -= r.roomStalled[room] }
            // Every member present at the start of the step should get every message sent to its room.
            var expected = 0
            for room in 0..<min(members.count, r.roomSent.count) { expected += r.roomSent[room] * members[room] }
            let lost = expected - c.deliveries
            let window = Double(r.elapsedNs) / 1e9
            var offered = 0.0
            for room in 0..<members.count {
                offered += rate * Double(ctx.spec.publisherSlots(room: room)) / Double(max(1, p.publishers)) * Double(members[room])
            }
            let achieved = window > 0 ? Double(r.windowDeliveries) / window : 0
            let lat = LatencySummary(r.latency)
            let broken = lost != 0 || c.duplicates != 0 || c.holes != 0 || c.orderViolations != 0 || c.unexpectedCloses != 0 || c.errors != 0
            let pass = everyoneJoined && offered > 0 && lat.p99ms <= p.p99LimitMs && !broken && !r.aborted && achieved >= 0.95 * offered
            if pass {
                best = max(best, achieved)
                bestRate = max(bestRate, rate)
            }
            var step: JSON = [
                "rate_msgs_per_s": rate, "seconds": round3(window), "drain_seconds": round3(Double(r.drainNs) / 1e9),
                "sent": c.sent, "sent_in_window": r.windowSent,
                "deliveries": c.deliveries, "deliveries_expected": expected,
                "offered_deliveries_per_s": round3(offered), "deliveries_per_s": round3(achieved),
                "lost": lost, "duplicates": c.duplicates, "holes": c.holes, "order_violations": c.orderViolations,
                "gaps": c.gaps, "unparsed": c.unparsed, "errors": c.errors, "byes": c.byes, "closed_by_server": c.unexpectedCloses,
                "error_kinds": r.errorKinds,
                "latency": lat.json,
                "server_cpu_us_per_delivery": cpu.serverMicros(per: c.deliveries),
                "server_sys_us_per_delivery": cpu.serverSystemMicros(per: c.deliveries),
                "client_cpu_us_per_message": cpu.clientMicros(per: c.deliveries + c.sent),
                "client_sys_us_per_message": cpu.clientSystemMicros(per: c.deliveries + c.sent),
                "cpu": cpu.json, "pass": pass, "aborted": r.aborted,
            ]
            if p.stalled > 0 {
                step["stalled_members"] = r.stalledMembers
                step["stalled_seen_closed"] = r.stalledGone
            }
            steps.append(step)
            summary.append("  \(fmt(rate, 0)) msg/s -> \(fmt(achieved, 0)) deliveries/s (offered \(fmt(offered, 0))): latency \(lat.text)")
            summary.append("      lost \(lost), dup \(c.duplicates), holes \(c.holes), order \(c.orderViolations), closed \(c.unexpectedCloses), errors \(c.errors)\(kindsText(r)); server CPU \(fmt(cpu.serverMicros(per: c.deliveries), 2)) us/delivery (\(fmt(100 * cpu.serverSeconds / max(cpu.seconds, 0.001), 0))% of a core; kernel \(fmt(cpu.serverSystemMicros(per: c.deliveries), 2))), load generator \(fmt(cpu.clientMicros(per: c.deliveries + c.sent), 2)) us/message (kernel \(fmt(cpu.clientSystemMicros(per: c.deliveries + c.sent), 2))); \(pass ? "PASS" : "FAIL") (p99 <= \(fmt(p.p99LimitMs, 0)) ms, nothing lost\(everyoneJoined ? "" : "; only \(joined) of \(p.members) members joined"))")
            if r.aborted {
                summary.append("      cut short after \(fmt(window, 1)) s: p99 so far above \(fmt(p.abortP99Ms, 0)) ms")
            }
            if p.stalled > 0 {
                summary.append("      stalled members \(r.stalledMembers) (not reading; left out of the figures above), \(r.stalledGone) of them seen closed so far")
            }
            members = r.roomMembers
            if p.stopOnFail && !pass { break }
            if p.abortP99Ms > 0 && (r.aborted || broken) {
                if k + 1 < p.rates.count {
                    summary.append("  higher rates skipped (\(p.rates[(k + 1)...].map { fmt($0, 0) }.joined(separator: ", ")) msg/s): this step \(r.aborted ? "was cut short" : "lost or broke order")")
                }
                break
            }
            sleepMillis(500)
        }
        // The stalled members read again: does each find its connection ended (close frame or
        // TCP close) within 2 s, or still open?
        var stalledProbe: PhaseReport?
        if p.stalled > 0 {
            m.begin("fanout: stalled members reading again")
            stalledProbe = ctx.driver.probeStalled(seconds: stalledProbeSeconds)
        }
        m.begin("closing")
        let left = ctx.driver.closeAll()
        var params: JSON = ["members": p.members, "rooms": p.rooms, "publishers": p.publishers, "rates": p.rates,
                            "duration_s": p.duration, "p99_limit_ms": p.p99LimitMs, "abort_p99_ms": p.abortP99Ms, "text_bytes": p.textBytes]
        if p.stalled > 0 { params["stalled"] = p.stalled }
        var result: JSON = [
            "scenario": p.scenario,
            "params": params,
            "joined": joined, "setup_failed": totalFailures(setup), "setup_failures": failureJSON(setup),
            "setup_seconds": round3(Double(setup.elapsedNs) / 1e9),
            "steps": steps, "best_passing_deliveries_per_s": round3(best), "best_passing_rate_msgs_per_s": bestRate, "not_closed": left,
        ]
        summary.append("  best rate that passed: \(fmt(best, 0)) deliveries/s\(bestRate > 0 ? " (\(fmt(bestRate, 0)) msg/s)" : "")")
        if let s = stalledProbe {
            let open = s.stalledMembers - s.stalledGone
            result["stalled_members"] = s.stalledMembers
            result["stalled_disconnected"] = s.stalledGone
            result["stalled_still_open"] = open
            result["stalled_close_kinds"] = s.stalledKinds
            let kinds = s.stalledKinds.isEmpty ? "" : " (" + s.stalledKinds.sorted { $0.value > $1.value }.prefix(5).map { "\($0.key): \($0.value)" }.joined(separator: ", ") + ")"
            summary.append("  stalled members: \(s.stalledMembers) of \(p.stalled) stopped reading; reading again for \(fmt(stalledProbeSeconds, 0)) s at the end: \(s.stalledGone) disconnected by the server, \(open) still open\(kinds)")
        }
        ctx.finish(result, summary: summary)
    }

    /// How long stalled members read again at the end of a fanout, to see whether the server cut them off.
    static let stalledProbeSeconds = 2.0

    static func churn(_ ctx: Context, rate: Double, duration: Double, rooms: Int) {
        let m = ctx.monitor
        m.begin("churn \(fmt(rate, 0))/s")
        let s0 = m.sample()
        let r = ctx.driver.churn(rate: rate, seconds: duration)
        let s1 = m.sample()
        let cpu = CPUUse(s0, s1, client: r)
        let c = r.counters
        let seconds = Double(r.elapsedNs) / 1e9
        let perSecond = seconds > 0 ? Double(c.cycles) / seconds : 0
        let cycle = LatencySummary(r.cycle), join = LatencySummary(r.setup), hs = LatencySummary(r.handshake)
        let result: JSON = [
            "scenario": "churn",
            "params": ["rate_per_s": rate, "duration_s": duration, "rooms": rooms],
            "attempted": c.connectAttempts, "cycles": c.cycles, "failed": c.cycleFailures + c.setupTimeouts,
            "failures": failureJSON(r), "seconds": round3(seconds), "cycles_per_s": round3(perSecond),
            "handshake_latency": hs.json, "join_latency": join.json, "cycle_latency": cycle.json,
            "server_cpu_us_per_cycle": cpu.serverMicros(per: c.cycles),
            "client_cpu_us_per_cycle": cpu.clientMicros(per: c.cycles),
            "cpu": cpu.json,
        ]
        ctx.finish(result, summary: [
            "churn: \(c.cycles) of \(c.connectAttempts) cycles (connect, join, leave, close) in \(fmt(seconds, 2)) s = \(fmt(perSecond, 0))/s, \(c.cycleFailures + c.setupTimeouts) failed\(kindsText(r))",
            "  handshake \(hs.text)",
            "  to joined \(join.text)",
            "  whole cycle \(cycle.text)",
            "  server CPU \(fmt(cpu.serverMicros(per: c.cycles), 1)) us/cycle; load generator \(fmt(cpu.clientMicros(per: c.cycles), 1)) us/cycle",
        ])
    }
}
