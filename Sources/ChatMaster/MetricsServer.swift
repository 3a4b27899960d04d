#if canImport(Glibc)
import Glibc
#endif
import ChatLink
import ChatSystem
import Prometheus

/// The master's figures for Prometheus. Children report cumulative counters with each
/// heartbeat; the master adds each report's increase to counters labelled by role and
/// slot, so the series keep counting across a child's restart, and sets gauges from the
/// live children when scraped.
final class MetricsBook {
    let registry = PrometheusCollectorRegistry()
    private var previous: [pid_t: ChildStats] = [:]
    private var latency: [Labels: ValueHistogram] = [:]
    /// The gauges of the last scrape, and of this one while it is built: a slot without a
    /// live child (or a room no longer busy) has its figures removed (a gap in a graph)
    /// rather than frozen at their last value.
    private var shownGauges: [ObjectIdentifier: Gauge] = [:]
    private var shownNow: [ObjectIdentifier: Gauge] = [:]

    /// What the master knows of one wanted slot when scraped.
    struct SlotHealth {
        var role: String
        var slot: Int
        var running: Bool
        var crashLooping: Bool
    }

    init() {
        // Series that exist from the start, so that an alert's `increase()` sees their
        // first event too.
        for ok in [true, false] { reloadCounter(ok: ok) }
    }

    private struct Labels: Hashable {
        var role: String
        var slot: Int
        var pairs: [(String, String)] { [("role", role), ("slot", "\(slot)")] }
    }

    /// Adds what changed since the child's previous report.
    func record(_ stats: ChildStats, role: String, slot: Int, pid: pid_t) {
        let before = previous[pid] ?? ChildStats()
        previous[pid] = stats
        let labels = Labels(role: role, slot: slot)
        func add(_ name: String, _ help: String, _ now: Int, _ then: Int) {
            let counter = registry.makeCounter(descriptor: Self.descriptor(name, unit: "total", help: help), labels: labels.pairs)
            if now > then { counter.increment(by: Int64(now - then)) }
        }
        add("joins", "Room joins requested", stats.joins, before.joins)
        add("bus_joins", "Join requests sent to the bus (one loop tick's joins of a room from the same resume point go as one)", stats.busJoins, before.busJoins)
        add("messages_in", "Requests received from clients (relay: messages sequenced)", stats.messagesIn, before.messagesIn)
        add("frames_out", "Frames sent (relay: messages forwarded to workers)", stats.messagesOut, before.messagesOut)
        add("deliveries", "Room messages written to members", stats.deliveries, before.deliveries)
        add("bytes_out", "Bytes of frames sent to clients", stats.bytesOut, before.bytesOut)
        add("slow_consumer_disconnects", "Connections closed for falling behind", stats.slowConsumerDisconnects, before.slowConsumerDisconnects)
        add("flood_disconnects", "Connections closed for flooding", stats.floodDisconnects, before.floodDisconnects)
        add("archive_lost", "Messages lost to the archive: no longer in the bus history when caught up, or refused by the database", stats.archiveLost, before.archiveLost)
        add("coalesced_deliveries", "Room messages written to members in busy rooms' gathering windows (coalesced delivery)", stats.gatheredDeliveries, before.gatheredDeliveries)
        add("coalesced_writes", "Member writes that ended busy rooms' gathering windows (deliveries per write: frames per write)",
            stats.gatheredWrites, before.gatheredWrites)
        add("file_limit_refusals", "Connections answered 503 because the process had no file left", stats.fileLimitRefusals, before.fileLimitRefusals)
        recordLatency(stats, before: before, labels: labels)
    }

    func forget(pid: pid_t) {
        previous[pid] = nil
    }

    /// A child started in the slot: its supervision counters exist from now on.
    func started(role: String, slot: Int) {
        _ = restartCounter(role: role, slot: slot)
        _ = watchdogCounter(role: role, slot: slot)
    }

    func restarted(role: String, slot: Int) {
        restartCounter(role: role, slot: slot).increment()
    }

    func reloaded(ok: Bool) {
        reloadCounter(ok: ok).increment()
    }

    func watchdogKilled(role: String, slot: Int) {
        watchdogCounter(role: role, slot: slot).increment()
    }

    private func restartCounter(role: String, slot: Int) -> Counter {
        registry.makeCounter(descriptor: Self.descriptor("restarts", unit: "total", help: "Children restarted after an unplanned exit"),
                             labels: Labels(role: role, slot: slot).pairs)
    }

    private func watchdogCounter(role: String, slot: Int) -> Counter {
        registry.makeCounter(descriptor: Self.descriptor("watchdog_kills", unit: "total", help: "Children killed for a stopped heartbeat"),
                             labels: Labels(role: role, slot: slot).pairs)
    }

    @discardableResult
    private func reloadCounter(ok: Bool) -> Counter {
        registry.makeCounter(descriptor: Self.descriptor("reloads", unit: "total", help: "Config reloads"),
                             labels: [("result", ok ? "ok" : "failed")])
    }

    /// Gauges from the children alive now and the slots wanted now.
    func refreshGauges(children: [(role: String, slot: Int, stats: ChildStats)], slots: [SlotHealth]) {
        func set(_ name: String, unit: String = "", _ help: String, _ labels: Labels, _ value: Int) {
            show(name, unit: unit, help, labels.pairs, Double(value))
        }
        var totals: [Labels: (connections: Int, rooms: Int, resident: Int)] = [:]
        for child in children {
            let labels = Labels(role: child.role, slot: child.slot)
            let sum = totals[labels] ?? (0, 0, 0)
            totals[labels] = (sum.connections + child.stats.connections, sum.rooms + child.stats.rooms, sum.resident + child.stats.residentBytes)
        }
        for (labels, sum) in totals {
            set("connections", "Open client connections (relay: worker links)", labels, sum.connections)
            set("rooms", "Rooms with members", labels, sum.rooms)
            set("resident", unit: "bytes", "Resident set size of the slot's processes", labels, sum.resident)
        }
        refreshTransports(children.filter { $0.role == "worker" })
        refreshGatheringRooms(children.flatMap(\.stats.gatheringRooms))
        for child in children where child.role == "archiver" {
            set("archive_backlog", unit: "messages", "Messages waiting to be written to the archive",
                Labels(role: child.role, slot: child.slot), child.stats.archiveBacklog)
        }
        for health in slots {
            let labels = Labels(role: health.role, slot: health.slot)
            set("up", "1 while the slot has a running child", labels, health.running ? 1 : 0)
            set("crash_looping", "1 while the slot is crash-looping (backing off between failed starts)", labels, health.crashLooping ? 1 : 0)
        }
        for (id, gauge) in shownGauges where shownNow[id] == nil { registry.unregisterGauge(gauge) }
        shownGauges = shownNow
        shownNow = [:]
    }

    /// Sets a gauge of this scrape; one not set again by the next scrape is removed.
    private func show(_ name: String, unit: String = "", _ help: String, _ labels: [(String, String)], _ value: Double) {
        let gauge = registry.makeGauge(descriptor: Self.descriptor(name, unit: unit, help: help), labels: labels)
        gauge.set(to: value)
        shownNow[ObjectIdentifier(gauge)] = gauge
    }

    /// Each worker slot's connections split by transport; `chatgw_connections` stays the total.
    private func refreshTransports(_ workers: [(role: String, slot: Int, stats: ChildStats)]) {
        var bySlot: [Int: (webSocket: Int, eventStream: Int)] = [:]
        for worker in workers {
            let sum = bySlot[worker.slot] ?? (0, 0)
            let streams = worker.stats.eventStreamConnections
            bySlot[worker.slot] = (sum.webSocket + worker.stats.connections - streams, sum.eventStream + streams)
        }
        let help = "Open client connections by transport (websocket, sse)"
        for (slot, sum) in bySlot {
            let labels = Labels(role: "worker", slot: slot).pairs
            show("transport_connections", help, labels + [("transport", "websocket")], Double(sum.webSocket))
            show("transport_connections", help, labels + [("transport", "sse")], Double(sum.eventStream))
        }
    }

    /// One series per room whose messages are gathered now (a handful of busy rooms, not
    /// every room); a room that went quiet loses its series.
    private func refreshGatheringRooms(_ reports: [GatheringRoom]) {
        for (room, report) in GatheringRoom.merged(reports) {
            show("room_frames_per_write", "Frames per member write in a room whose messages are gathered (busy rooms only)",
                 [("room", room)], report.framesPerWrite)
        }
    }

    private static func descriptor(_ name: String, unit: String, help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "chatgw", metricName: name, unitName: unit, helpText: help)
    }

    func text() -> String {
        registry.emitToString()
    }

    /// Children count round trips into fixed buckets; each bucket's increase is replayed
    /// into the histogram at the bucket's bound (bucket counts are exact, the sum is an
    /// upper estimate).
    private func recordLatency(_ stats: ChildStats, before: ChildStats, labels: Labels) {
        guard !stats.busLatencyBuckets.isEmpty else { return }
        let histogram = latency[labels] ?? registry.makeValueHistogram(
            descriptor: Self.descriptor("bus_latency", unit: "seconds", help: "Bus round trip from publish to sequenced answer"),
            labels: labels.pairs, buckets: BusLatency.bucketBounds)
        latency[labels] = histogram
        let bounds = BusLatency.bucketBounds + [BusLatency.bucketBounds[BusLatency.bucketBounds.count - 1] * 2]
        let increases = BusLatency.increase(from: before.busLatencyBuckets, to: stats.busLatencyBuckets)
        for (index, increase) in increases.enumerated() where index < bounds.count {
            for _ in 0..<min(increase, 100_000) { histogram.record(bounds[index]) }
        }
    }
}

/// Serves `GET /metrics` (Prometheus text), `GET /status` and `GET /status.json` (see
/// `MasterRoute`) from the supervision loop. Requests are tiny and answered at once;
/// anything else gets 404, a request over 8 KiB or slower than 5 s is dropped. At most 64
/// connections at once; more wait in the kernel's queue.
final class MetricsServer {
    private let listenFD: Int32
    private var clients: [Int32: (buffer: [UInt8], openedAt: Double)] = [:]
    private var gate = AcceptGate(maxClients: 64)

    init(host: String, port: Int) throws(SystemError) {
        let fd = try ListeningSocket.bind(host: host, port: port, backlog: 64, reusePort: false)
        try Descriptors.setNonBlocking(fd)
        listenFD = fd
    }

    var acceptResumesAt: Double? { gate.resumesAt }

    var pollDescriptors: [Int32] { (gate.isOpen(clients: clients.count) ? [listenFD] : []) + Array(clients.keys) }

    /// `apiKey` is the current `api.key` (a reload may change it).
    func serve(apiKey: String, answer: (MasterPage) -> MasterAnswer) {
        while true {
            guard let fd = gate.next(from: listenFD, clients: clients.count) else { break }
            clients[fd] = ([], monotonicSeconds())
        }
        let now = monotonicSeconds()
        for fd in Array(clients.keys) {
            guard var client = clients[fd] else { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(fd, &chunk, chunk.count)
            if count == 0 || (count < 0 && errno != EAGAIN) || client.buffer.count > 8192 || now - client.openedAt > 5 {
                drop(fd)
                continue
            }
            if count > 0 { client.buffer += chunk[0..<count] }
            clients[fd] = client
            let request = String(decoding: client.buffer, as: UTF8.self)
            guard request.contains("\r\n\r\n") || request.contains("\n\n") else { continue }
            switch MasterRoute.of(head: request, apiKey: apiKey) {
            case .page(let page): respond(fd, answer(page))
            case .unauthorized: respond(fd, .unauthorized)
            case .notFound: respond(fd, .notFound)
            }
        }
    }

    func closeAll() {
        for fd in clients.keys { close(fd) }
        clients.removeAll()
        close(listenFD)
    }

    private func respond(_ fd: Int32, _ answer: MasterAnswer) {
        SocketWriter.writeAll(answer.bytes, to: fd)
        drop(fd)
    }

    private func drop(_ fd: Int32) {
        close(fd)
        clients[fd] = nil
    }
}
