#if canImport(Glibc)
import Glibc
#endif
import ChatConfig
import ChatControl
import ChatLink
import ChatSystem
import Foundation
import Logging

/// Why the master could not start, in one line for the user.
public struct StartupError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// The master's supervision loop, after gunicorn's arbiter: signals only enqueue; one
/// loop takes them, reads the children's links and the control socket, reaps the dead,
/// kills the hung, and converges the live children to the wanted slots. It never
/// touches a client.
///
/// Reload and scaling are both "change the wanted slots, then converge": a slot whose
/// generation moved on gets a new child, and the old one is drained once the new one is
/// ready; a removed slot's child is drained; an added slot gets a socket and a child.
public final class Arbiter {
    private enum Phase {
        case running
        case stopping(reason: StopReason, deadline: Double)
    }

    public static let version = "0.1.0"

    private var settings: MasterSettings
    private let loadConfig: () -> Result<GatewayConfig, ConfigError>
    private let configPath: String?
    private let signals: SignalQueue
    private let logger: Logger
    private let startedAt = monotonicSeconds()
    private var phase = Phase.running
    private var generation = 1
    private var boundPort: Int
    private var children: [pid_t: Child] = [:]
    private var slots: [SlotID: SlotRecord] = [:]
    private var lastReload: ReloadReport?
    private var watchdogKills = 0
    private let control: ControlServer
    private let metrics: MetricsServer?
    private let book = MetricsBook()
    private var pendingRooms: [Int: (ControlResponse) -> Void] = [:]
    private var nextRoomsRequest = 0

    /// Binds the worker slots' listening sockets, the control socket and the metrics
    /// listener. Throws a one-line reason naming the address that could not be had.
    public init(config: GatewayConfig, configPath: String?, executable: String, logger: Logger,
                loadConfig: @escaping () -> Result<GatewayConfig, ConfigError>) throws(StartupError) {
        settings = MasterSettings(config: config, executable: executable)
        self.configPath = configPath
        self.loadConfig = loadConfig
        self.logger = logger
        boundPort = config.server.listen.port
        do {
            signals = try SignalQueue(signals: [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGCHLD])
        } catch {
            throw StartupError("cannot set up signal handling: \(error)")
        }
        SignalQueue.ignore(SIGPIPE)
        var sockets: [Int32] = []
        do {
            try ListeningSocket.checkAvailable(host: settings.host, port: boundPort)
            for _ in 0..<settings.workerCount {
                let fd = try ListeningSocket.bind(host: settings.host, port: boundPort, backlog: settings.backlog, reusePort: true)
                if boundPort == 0 { boundPort = ListeningSocket.localPort(fd) }
                sockets.append(fd)
            }
        } catch {
            sockets.forEach { close($0) }
            throw StartupError("cannot listen on \(config.server.listen): \(error.reason)")
        }
        do {
            control = try ControlServer(path: config.controlSocketPath)
        } catch {
            sockets.forEach { close($0) }
            throw StartupError("cannot create the control socket \(config.controlSocketPath): \(error.reason)")
        }
        if let address = config.metrics.listen {
            do {
                metrics = try MetricsServer(host: address.host, port: address.port)
            } catch {
                sockets.forEach { close($0) }
                control.closeAll()
                throw StartupError("cannot listen on \(address) (metrics.listen): \(error.reason)")
            }
        } else {
            metrics = nil
        }
        if config.bus.kind == .relay {
            slots[SlotID(role: .relay, index: 0)] = SlotRecord(policy: RestartPolicy(settings: settings.restart), generation: generation)
        }
        if config.archive.kind != .none {
            slots[SlotID(role: .archiver, index: 0)] = SlotRecord(policy: RestartPolicy(settings: settings.restart), generation: generation)
        }
        applyWorkerCount(settings.workerCount, sockets: Dictionary(uniqueKeysWithValues: sockets.enumerated().map { ($0.offset, $0.element) }))
        logger.info("listening on \(settings.host):\(boundPort)", metadata: [
            "backlog": "\(settings.backlog)", "sockets": "\(settings.workerCount)",
        ])
    }

    /// The port clients connect to (resolved when the config asked for port 0).
    public var listenPort: Int { boundPort }

    /// Runs until a stop completes; returns the master's exit code.
    public func run() -> Int32 {
        while true {
            waitForEvents(timeout: nextWakeup())
            for signal in signals.drain() { handle(signal: signal) }
            readLinks()
            control.serve { request, reply in handle(request, reply: reply) }
            metrics?.serve { metricsText() }
            reap()
            murderUnresponsive()
            if case .stopping = phase {
                if children.isEmpty { break }
                advanceStop()
            } else {
                manageChildren()
            }
        }
        closeListeners()
        control.closeAll()
        metrics?.closeAll()
        logger.info("stopped")
        return 0
    }

    // MARK: signals and commands

    private func handle(signal: Int32) {
        switch signal {
        case SIGTERM, SIGINT: beginStop(.shutdown)
        case SIGQUIT: beginStop(.drain)
        case SIGHUP: reload()
        case SIGTTIN: scale(to: slots.keys.filter { $0.role == .worker }.count + 1)
        case SIGTTOU: scale(to: slots.keys.filter { $0.role == .worker }.count - 1)
        default: break  // SIGCHLD: reaped below
        }
    }

    private func handle(_ request: ControlRequest, reply: @escaping (ControlResponse) -> Void) {
        switch request.command {
        case .status, .workers:
            reply(ControlResponse(ok: true, status: statusReport()))
        case .rooms:
            guard let relay = children.values.first(where: { $0.slot.role == .relay && $0.state == .running }) else {
                return reply(.failure("the relay is not running"))
            }
            nextRoomsRequest += 1
            pendingRooms[nextRoomsRequest] = reply
            relay.send(.roomsRequest(id: nextRoomsRequest, top: max(1, min(request.top ?? 20, 10_000))))
        case .reload:
            reload()
            let report = lastReload
            reply(ControlResponse(ok: report?.ok ?? false, error: report?.error, message: report?.ok == true ? "reloaded: generation \(generation)" : nil,
                                  status: statusReport()))
        case .stop:
            beginStop(request.fast == true ? .shutdown : .drain)
            reply(ControlResponse(ok: true, message: request.fast == true ? "stopping" : "draining, then stopping"))
        case .scale:
            guard let count = request.count, (1...GatewayConfig.maxWorkers).contains(count) else {
                return reply(.failure("scale takes a worker count from 1 to \(GatewayConfig.maxWorkers)"))
            }
            scale(to: count)
            reply(ControlResponse(ok: true, message: "scaling to \(count) workers"))
        case .kick:
            guard let user = request.user, !user.isEmpty else { return reply(.failure("kick takes a user name")) }
            let workers = children.values.filter { $0.slot.role == .worker }
            for worker in workers { worker.send(.kick(user: user)) }
            reply(ControlResponse(ok: true, message: "kick of \(user) sent to \(workers.count) workers"))
        }
    }

    private func beginStop(_ reason: StopReason) {
        guard case .running = phase else { return }
        let deadline = monotonicSeconds() + settings.drainTimeout
        logger.info("stopping", metadata: ["reason": "\(reason.rawValue)", "drain_timeout_s": "\(settings.drainTimeout)"])
        phase = .stopping(reason: reason, deadline: deadline)
        // Workers hold their own copies; closing ours lets the kernel refuse new
        // connections as soon as the last worker stops accepting.
        closeListeners()
        for child in children.values where child.slot.role == .worker {
            drain(child, reason: reason, keepAccepting: false)
        }
        stopRelayIfWorkersGone()
    }

    /// Workers go first so that the relay (and the archiver) can serve their last messages.
    private func advanceStop() {
        stopRelayIfWorkersGone()
        guard case .stopping(_, let deadline) = phase, monotonicSeconds() >= deadline else { return }
        for child in children.values {
            logger.warning("killing child after drain timeout", metadata: metadata(child))
            kill(child.pid, SIGKILL)
        }
    }

    private func stopRelayIfWorkersGone() {
        guard case .stopping = phase, !children.values.contains(where: { $0.slot.role == .worker }) else { return }
        for child in children.values where child.slot.role != .worker {
            if case .draining = child.state { continue }
            drain(child, reason: .shutdown, keepAccepting: false)
        }
    }

    /// Asks a child to say goodbye and exit; it is killed if still alive at the drain timeout.
    private func drain(_ child: Child, reason: StopReason, keepAccepting: Bool) {
        if case .draining = child.state { return }
        let windowMs = reason == .shutdown ? 0 : Int(settings.drainTimeout * 800)
        child.send(.stop(reason: reason, windowMs: windowMs, keepAccepting: keepAccepting))
        child.state = .draining(deadline: monotonicSeconds() + settings.drainTimeout)
    }

    // MARK: reload and scaling

    /// Re-reads the config. Invalid: keep everything, report why. Valid: the next
    /// generation of workers takes over slot by slot.
    private func reload() {
        guard case .running = phase else { return }
        let config: GatewayConfig
        switch loadConfig() {
        case .failure(let error):
            return reloadFailed(error.description)
        case .success(let loaded):
            config = loaded
        }
        let next = MasterSettings(config: config, executable: settings.executable)
        let listenChanged = next.config.server.listen != settings.config.server.listen
        var newSockets: [Int: Int32] = [:]
        if listenChanged {
            do {
                try ListeningSocket.checkAvailable(host: next.host, port: next.port)
                for index in 0..<next.workerCount {
                    newSockets[index] = try ListeningSocket.bind(host: next.host, port: next.port, backlog: next.backlog, reusePort: true)
                }
            } catch {
                newSockets.values.forEach { close($0) }
                return reloadFailed("cannot listen on \(next.config.server.listen): \(error.reason); still serving on \(settings.host):\(boundPort)")
            }
        }
        let relayChanged = next.relayDiffers(from: settings)
        let archiverChanged = next.archiverDiffers(from: settings)
        generation += 1
        settings = next
        if listenChanged {
            boundPort = next.port == 0 ? (newSockets.values.first.map(ListeningSocket.localPort) ?? 0) : next.port
            for (slot, record) in slots where slot.role == .worker {
                if let fd = record.listenFD { close(fd) }
                slots[slot]?.listenFD = nil
            }
        }
        applyWorkerCount(next.workerCount, sockets: newSockets)
        for slot in slots.keys where slot.role == .worker {
            slots[slot]?.generation = generation
            slots[slot]?.nextStartAt = 0
        }
        if relayChanged {
            replaceSingleton(.relay, wanted: next.config.bus.kind == .relay, restart: next.restart)
        }
        if archiverChanged {
            replaceSingleton(.archiver, wanted: next.config.archive.kind != .none, restart: next.restart)
        }
        lastReload = ReloadReport(ok: true, at: Date().timeIntervalSince1970, generation: generation, error: nil)
        book.reloaded(ok: true)
        logger.info("reloading", metadata: ["generation": "\(generation)", "workers": "\(next.workerCount)",
                                            "relay": relayChanged ? "replaced" : "kept", "listen": "\(next.host):\(boundPort)"])
    }

    /// The relay or the archiver after a reload changed its settings: the current one
    /// drains, and (if still wanted) a new one of this generation starts once it is gone.
    private func replaceSingleton(_ role: ChildRole, wanted: Bool, restart: RestartPolicy.Settings) {
        let slot = SlotID(role: role, index: 0)
        if wanted {
            slots[slot, default: SlotRecord(policy: RestartPolicy(settings: restart), generation: generation)].generation = generation
            slots[slot]?.nextStartAt = 0
        } else {
            slots[slot] = nil
        }
        for child in children.values where child.slot == slot {
            drain(child, reason: .shutdown, keepAccepting: false)
        }
    }

    private func reloadFailed(_ reason: String) {
        lastReload = ReloadReport(ok: false, at: Date().timeIntervalSince1970, generation: generation, error: reason)
        book.reloaded(ok: false)
        logger.error("reload failed; still running the previous config", metadata: ["reason": "\(reason)", "generation": "\(generation)"])
    }

    private func scale(to count: Int) {
        guard case .running = phase, count >= 1, count <= GatewayConfig.maxWorkers else {
            logger.warning("scale refused", metadata: ["workers": "\(count)"])
            return
        }
        applyWorkerCount(count, sockets: [:])
        logger.info("scaled", metadata: ["workers": "\(count)"])
    }

    /// Adds or removes worker slots. A removed slot's child drains and keeps accepting
    /// what is queued on its socket until it exits (the socket goes with it).
    private func applyWorkerCount(_ count: Int, sockets: [Int: Int32]) {
        for (slot, record) in slots where slot.role == .worker && slot.index >= count {
            slots[slot] = nil
            if let fd = record.listenFD { close(fd) }
            for child in children.values where child.slot == slot {
                drain(child, reason: .reload, keepAccepting: true)
            }
        }
        for index in 0..<count {
            let slot = SlotID(role: .worker, index: index)
            if slots[slot] == nil {
                var record = SlotRecord(policy: RestartPolicy(settings: settings.restart), generation: generation)
                record.listenFD = sockets[index]
                slots[slot] = record
            } else if let fd = sockets[index] {
                slots[slot]?.listenFD = fd
            }
        }
    }

    // MARK: children

    private func manageChildren() {
        let now = monotonicSeconds()
        for (slot, record) in slots.sorted(by: { ($0.key.role.rawValue, $0.key.index) < ($1.key.role.rawValue, $1.key.index) }) {
            guard let due = record.nextStartAt, due <= now else { continue }
            let alive = children.values.filter { $0.slot == slot }
            if alive.contains(where: { $0.generation == record.generation && !$0.isDraining }) {
                slots[slot]?.nextStartAt = nil
                continue
            }
            // One relay (archiver) at a time: a replaced one must let go of its socket, journal or database first.
            if slot.role != .worker && !alive.isEmpty { continue }
            spawn(slot)
        }
    }

    private func spawn(_ slot: SlotID) {
        guard var record = slots[slot] else { return }
        do {
            var inherit: [Spawner.Inherit] = []
            if slot.role == .worker {
                let listenFD = try record.listenFD ?? ListeningSocket.bind(host: settings.host, port: boundPort, backlog: settings.backlog, reusePort: true)
                record.listenFD = listenFD
                inherit.append(Spawner.Inherit(listenFD, as: Descriptors.childListenFD))
            }
            let (masterEnd, childEnd) = try Descriptors.socketPair()
            defer { close(childEnd) }
            try Descriptors.setNonBlocking(masterEnd)
            inherit.append(Spawner.Inherit(childEnd, as: Descriptors.childLinkFD))
            var arguments = [settings.executable, slot.role.rawValue]
            if slot.role == .worker { arguments += ["--slot", "\(slot.index)"] }
            arguments += ["--generation", "\(record.generation)"]
            var environment = ProcessEnvironment.current()
            environment[GatewayConfig.environmentJSONVariable] = childConfig().encodedJSON()
            environment["CHATGW_MASTER_PID"] = "\(getpid())"
            let pid = try Spawner.spawn(executable: settings.executable, arguments: arguments,
                                        environment: environment, inherit: inherit)
            let child = Child(pid: pid, slot: slot, generation: record.generation, linkFD: masterEnd, startedAt: monotonicSeconds())
            children[pid] = child
            record.nextStartAt = nil
            logger.info("child started", metadata: metadata(child))
        } catch {
            logger.error("cannot start child", metadata: ["role": "\(slot.role.rawValue)", "slot": "\(slot.index)", "error": "\(error)"])
            record.nextStartAt = monotonicSeconds() + record.policy.recordExit(uptime: 0)
        }
        slots[slot] = record
    }

    /// The config children get: the current one, with the port actually bound.
    private func childConfig() -> GatewayConfig {
        var config = settings.config
        config.server.listen.port = boundPort
        return config
    }

    private func reap() {
        for (pid, status) in ProcessControl.reapExited() {
            guard let child = children.removeValue(forKey: pid) else { continue }
            close(child.linkFD)
            book.forget(pid: pid)
            if child.slot.role == .relay {
                // Its answers to `rooms` will not come now.
                for reply in pendingRooms.values { reply(.failure("the relay exited before answering")) }
                pendingRooms.removeAll()
            }
            let uptime = monotonicSeconds() - child.startedAt
            var fields = metadata(child)
            fields["status"] = "\(status)"
            fields["uptime_s"] = "\((uptime * 10).rounded() / 10)"
            let record = slots[child.slot]
            let replaced = record == nil || record!.generation != child.generation
            if child.isDraining || replaced {
                logger.info("child exited", metadata: fields)
                continue
            }
            logger.warning("child exited", metadata: fields)
            guard case .running = phase, var record else { continue }
            let delay = record.policy.recordExit(uptime: uptime)
            record.nextStartAt = monotonicSeconds() + delay
            book.restarted(role: child.slot.role.rawValue, slot: child.slot.index)
            if record.policy.isCrashLooping {
                if !record.crashLoopReported {
                    logger.error("child crash-looping", metadata: [
                        "role": "\(child.slot.role.rawValue)", "slot": "\(child.slot.index)",
                        "exits": "\(record.policy.consecutiveFailures)", "last_status": "\(status)",
                        "next_attempt_ms": "\(Int(delay * 1000))",
                    ])
                    record.crashLoopReported = true
                }
                // A dead slot's socket would keep taking its share of connections with
                // nobody to accept them; close it so the kernel routes to live workers.
                if let fd = record.listenFD {
                    close(fd)
                    record.listenFD = nil
                }
            } else {
                logger.info("child restarting", metadata: ["role": "\(child.slot.role.rawValue)", "slot": "\(child.slot.index)", "in_ms": "\(Int(delay * 1000))"])
            }
            slots[child.slot] = record
        }
    }

    /// A child whose heartbeat stopped (a stuck event loop) is killed and then replaced.
    private func murderUnresponsive() {
        let now = monotonicSeconds()
        for child in children.values {
            switch child.state {
            case .starting where now - child.startedAt > settings.startTimeout,
                 .running where now - child.lastHeartbeat > settings.heartbeatTimeout:
                watchdogKills += 1
                book.watchdogKilled(role: child.slot.role.rawValue, slot: child.slot.index)
                var fields = metadata(child)
                fields["silent_s"] = "\(Int(now - child.lastHeartbeat))"
                logger.error("child unresponsive, killing", metadata: fields)
                kill(child.pid, SIGKILL)
                child.lastHeartbeat = now  // one kill per timeout, not one per loop turn
            case .draining(let deadline) where now > deadline:
                kill(child.pid, SIGKILL)
            default:
                break
            }
        }
    }

    // MARK: links

    private func readLinks() {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        for child in children.values {
            while true {
                let count = read(child.linkFD, &buffer, buffer.count)
                guard count > 0 else { break }
                do {
                    for line in try child.framer.append(buffer[0..<count]) {
                        handle(line: line, from: child)
                    }
                } catch {
                    logger.error("garbage on child link, killing", metadata: metadata(child))
                    kill(child.pid, SIGKILL)
                    break
                }
            }
        }
    }

    private func handle(line: [UInt8], from child: Child) {
        guard let message = try? LinkMessage.decode(line: line) else {
            logger.warning("undecodable line on child link", metadata: metadata(child))
            return
        }
        let now = monotonicSeconds()
        let sinceLast = now - child.lastHeartbeat
        child.lastHeartbeat = now
        switch message {
        case .ready:
            if child.state == .starting { child.state = .running }
            logger.info("child ready", metadata: metadata(child))
            retireOlderGenerations(of: child)
        case .heartbeat(let stats):
            if sinceLast > 0.05 {
                child.rates = (Double(stats.messagesIn - child.stats.messagesIn) / sinceLast,
                               Double(stats.messagesOut - child.stats.messagesOut) / sinceLast)
            }
            child.stats = stats
            book.record(stats, role: child.slot.role.rawValue, slot: child.slot.index, pid: child.pid)
            if child.state == .running, now - child.startedAt >= settings.restart.stableAfter {
                slots[child.slot]?.policy.recordStable()
                slots[child.slot]?.crashLoopReported = false
            }
        case .rooms(let id, let rooms):
            pendingRooms.removeValue(forKey: id)?(ControlResponse(ok: true, rooms: rooms))
        case .stop, .kick, .roomsRequest:
            logger.warning("child sent a master-only message", metadata: metadata(child))
        }
    }

    /// Once a slot's new-generation child serves, its predecessors drain.
    private func retireOlderGenerations(of child: Child) {
        guard child.slot.role == .worker else { return }
        for old in children.values where old.slot == child.slot && old.generation < child.generation {
            drain(old, reason: .reload, keepAccepting: false)
        }
    }

    // MARK: status and metrics

    private func statusReport() -> StatusReport {
        let now = monotonicSeconds()
        var reports = children.values.map { child in
            var report = ChildReport(
                role: child.slot.role.rawValue, slot: child.slot.index, pid: child.pid, generation: child.generation,
                state: child.stateName, uptimeSeconds: now - child.startedAt,
                restarts: slots[child.slot]?.policy.totalRestarts ?? 0,
                connections: child.stats.connections, rooms: child.stats.rooms,
                messagesInPerSecond: child.rates.messagesIn, messagesOutPerSecond: child.rates.messagesOut,
                rssBytes: child.stats.residentBytes)
            if child.slot.role == .archiver {
                report.archiveBacklog = child.stats.archiveBacklog
                report.archiveLost = child.stats.archiveLost
            }
            return report
        }
        for (slot, record) in slots where record.policy.isCrashLooping && !children.values.contains(where: { $0.slot == slot }) {
            reports.append(ChildReport(role: slot.role.rawValue, slot: slot.index, pid: 0, generation: record.generation,
                                       state: "crash-looping", uptimeSeconds: 0, restarts: record.policy.totalRestarts,
                                       connections: 0, rooms: 0, messagesInPerSecond: 0, messagesOutPerSecond: 0, rssBytes: 0))
        }
        reports.sort { ($0.role, $0.slot, $0.generation) < ($1.role, $1.slot, $1.generation) }
        return StatusReport(
            masterPid: getpid(), uptimeSeconds: now - startedAt, version: Self.version, configPath: configPath,
            generation: generation, listen: "\(settings.host):\(boundPort)",
            wantedWorkers: slots.keys.filter { $0.role == .worker }.count, lastReload: lastReload,
            watchdogKills: watchdogKills, children: reports)
    }

    private func metricsText() -> String {
        book.refreshGauges(children: children.values.map { ($0.slot.role.rawValue, $0.slot.index, $0.stats) })
        return book.text()
    }

    // MARK: waiting

    private func nextWakeup() -> Double {
        var wake = 0.5
        let now = monotonicSeconds()
        for record in slots.values {
            if let due = record.nextStartAt { wake = min(wake, max(0, due - now)) }
        }
        for due in [control.acceptResumesAt, metrics?.acceptResumesAt].compactMap({ $0 }) {
            wake = min(wake, max(0, due - now))
        }
        return wake
    }

    private func waitForEvents(timeout: Double) {
        var fds = [pollfd(fd: signals.readFD, events: Int16(POLLIN), revents: 0)]
        for child in children.values {
            fds.append(pollfd(fd: child.linkFD, events: Int16(POLLIN), revents: 0))
        }
        for fd in control.pollDescriptors + (metrics?.pollDescriptors ?? []) {
            fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
        }
        _ = poll(&fds, nfds_t(fds.count), Int32(timeout * 1000))
    }

    // MARK: sockets

    private func closeListeners() {
        for (slot, record) in slots {
            if let fd = record.listenFD {
                close(fd)
                slots[slot]?.listenFD = nil
            }
        }
    }

    private func metadata(_ child: Child) -> Logger.Metadata {
        ["role": "\(child.slot.role.rawValue)", "slot": "\(child.slot.index)", "pid": "\(child.pid)", "generation": "\(child.generation)"]
    }
}

extension Child {
    var isDraining: Bool {
        if case .draining = state { return true }
        return false
    }

    var stateName: String {
        switch state {
        case .starting: "starting"
        case .running: "running"
        case .draining: "draining"
        }
    }
}
