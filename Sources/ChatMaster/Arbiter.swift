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
/// Those decisions are the `SlotTable`'s; the arbiter tells it what happened and performs
/// the actions it returns.
public final class Arbiter {
    public static let version = "0.1.0"

    private var settings: MasterSettings
    private let loadConfig: () -> Result<GatewayConfig, ConfigError>
    private let configPath: String?
    private let signals: SignalQueue
    private let logger: Logger
    private let startedAt = monotonicSeconds()
    private var boundPort: Int
    private var table: SlotTable
    private var children: [pid_t: Child] = [:]
    private var lastReload: ReloadReport?
    private var watchdogKills = 0
    private let control: ControlServer
    private let metrics: MetricsServer?
    private let book = MetricsBook()
    private var pendingRooms: [Int: (ControlResponse) -> Void] = [:]
    private var nextRoomsRequest = 0
    private var topRooms = TopRooms()

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
        let sockets: [Int32]
        do {
            let bound = try Self.bindSlotSockets(settings.workerCount, host: settings.host, port: boundPort,
                                                 backlog: settings.backlog, checkAvailable: true)
            sockets = bound.sockets
            boundPort = bound.port
        } catch {
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
        table = SlotTable(rules: SlotTable.Rules(settings), workers: settings.workerCount, relay: config.bus.kind == .relay,
                          archiver: config.archive.kind != .none, sockets: sockets, at: monotonicSeconds())
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
            metrics?.serve(apiKey: settings.config.api.key) { page in answer(page) }
            reap()
            murderUnresponsive()
            if table.isFinished { break }
            manageChildren()
        }
        perform(table.closeSockets())
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
        case SIGTTIN: scale(to: table.workerCount + 1)
        case SIGTTOU: scale(to: table.workerCount - 1)
        default: break  // SIGCHLD: reaped below
        }
    }

    private func handle(_ request: ControlRequest, reply: @escaping (ControlResponse) -> Void) {
        switch request.command {
        case .status, .workers:
            reply(ControlResponse(ok: true, status: statusReport()))
        case .rooms:
            guard let relay = children.values.first(where: { $0.slot.role == .relay && table.children[$0.pid]?.state == .running }) else {
                return reply(.failure("the relay is not running"))
            }
            nextRoomsRequest += 1
            pendingRooms[nextRoomsRequest] = reply
            relay.send(.roomsRequest(id: nextRoomsRequest, top: max(1, min(request.top ?? 20, 10_000))))
        case .reload:
            reload()
            let report = lastReload
            reply(ControlResponse(ok: report?.ok ?? false, error: report?.error, message: report?.ok == true ? "reloaded: generation \(table.generation)" : nil,
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
        guard let actions = table.beginStop(reason, at: monotonicSeconds()) else { return }
        logger.info("stopping", metadata: ["reason": "\(reason.rawValue)", "drain_timeout_s": "\(settings.drainTimeout)"])
        perform(actions)
    }

    // MARK: reload and scaling

    /// Re-reads the config. Invalid: keep everything, report why. Valid: the next
    /// generation of workers takes over slot by slot.
    private func reload() {
        guard !table.isStopping else { return }
        let config: GatewayConfig
        switch loadConfig() {
        case .failure(let error):
            return reloadFailed(error.description)
        case .success(let loaded):
            config = loaded
        }
        let next = MasterSettings(config: config, executable: settings.executable)
        var newSockets: [Int32]?
        var port = boundPort
        if next.config.server.listen != settings.config.server.listen {
            do {
                let bound = try Self.bindSlotSockets(next.workerCount, host: next.host, port: next.port,
                                                     backlog: next.backlog, checkAvailable: true)
                newSockets = bound.sockets
                port = bound.port
            } catch {
                return reloadFailed("cannot listen on \(next.config.server.listen): \(error.reason); still serving on \(settings.host):\(boundPort)")
            }
        }
        // The relay or the archiver whose settings changed: the current one drains, and
        // (if still wanted) a new one of this generation starts once it is gone.
        let relayChanged = next.relayDiffers(from: settings)
        var replacing: [ChildRole: Bool] = [:]
        if relayChanged { replacing[.relay] = next.config.bus.kind == .relay }
        if next.archiverDiffers(from: settings) { replacing[.archiver] = next.config.archive.kind != .none }
        settings = next
        boundPort = port
        perform(table.reload(rules: SlotTable.Rules(next), workers: next.workerCount, replacing: replacing,
                             sockets: newSockets, at: monotonicSeconds()))
        lastReload = ReloadReport(ok: true, at: Date().timeIntervalSince1970, generation: table.generation, error: nil)
        book.reloaded(ok: true)
        logger.info("reloading", metadata: ["generation": "\(table.generation)", "workers": "\(next.workerCount)",
                                            "relay": relayChanged ? "replaced" : "kept", "listen": "\(next.host):\(boundPort)"])
    }

    private func reloadFailed(_ reason: String) {
        lastReload = ReloadReport(ok: false, at: Date().timeIntervalSince1970, generation: table.generation, error: reason)
        book.reloaded(ok: false)
        logger.error("reload failed; still running the previous config", metadata: ["reason": "\(reason)", "generation": "\(table.generation)"])
    }

    private func scale(to count: Int) {
        guard let actions = table.scale(to: count, at: monotonicSeconds()) else {
            logger.warning("scale refused", metadata: ["workers": "\(count)"])
            return
        }
        perform(actions)
        logger.info("scaled", metadata: ["workers": "\(count)"])
    }

    // MARK: children

    /// Running: starts the children that are due. Stopping: the relay and the archiver
    /// drain once the workers are gone, and what is left is killed at the deadline.
    private func manageChildren() {
        perform(table.converge(at: monotonicSeconds()))
    }

    /// Does what the slot table decided.
    private func perform(_ actions: [SlotTable.Action]) {
        for action in actions {
            switch action {
            case .start(let slot, let generation, let socket):
                start(slot, generation: generation, socket: socket)
            case .drain(let pid, let reason, let windowMs, let keepAccepting):
                children[pid]?.send(.stop(reason: reason, windowMs: windowMs, keepAccepting: keepAccepting))
            case .kill(let pid, let cause):
                if let child = children[pid] { report(kill: cause, of: child) }
                kill(pid, SIGKILL)
            case .closeSocket(let fd):
                close(fd)
            }
        }
    }

    private func report(kill cause: SlotTable.KillCause, of child: Child) {
        switch cause {
        case .unresponsive(let silentFor):
            watchdogKills += 1
            book.watchdogKilled(role: child.slot.role.rawValue, slot: child.slot.index)
            var fields = metadata(child)
            fields["silent_s"] = "\(Int(silentFor))"
            logger.error("child unresponsive, killing", metadata: fields)
        case .stopTimedOut:
            logger.warning("killing child after drain timeout", metadata: metadata(child))
        case .drainOverdue:
            break
        }
    }

    private func start(_ slot: SlotID, generation: Int, socket: SlotTable.ChildSocket) {
        do {
            var inherit: [Spawner.Inherit] = []
            switch socket {
            case .none:
                break
            case .slot(let listenFD):
                inherit.append(Spawner.Inherit(listenFD, as: Descriptors.childListenFD))
            case .bindFirst:
                let listenFD = try Self.bindSlotSockets(1, host: settings.host, port: boundPort, backlog: settings.backlog,
                                                        checkAvailable: false).sockets[0]
                table.adopt(socket: listenFD, for: slot)
                inherit.append(Spawner.Inherit(listenFD, as: Descriptors.childListenFD))
            }
            let (masterEnd, childEnd) = try Descriptors.socketPair()
            defer { close(childEnd) }
            try Descriptors.setNonBlocking(masterEnd)
            inherit.append(Spawner.Inherit(childEnd, as: Descriptors.childLinkFD))
            var arguments = [settings.executable, slot.role.rawValue]
            if slot.role == .worker { arguments += ["--slot", "\(slot.index)"] }
            arguments += ["--generation", "\(generation)"]
            var environment = ProcessEnvironment.current()
            environment[GatewayConfig.environmentJSONVariable] = childConfig().encodedJSON()
            environment["CHATGW_MASTER_PID"] = "\(getpid())"
            let pid = try Spawner.spawn(executable: settings.executable, arguments: arguments,
                                        environment: environment, inherit: inherit)
            let now = monotonicSeconds()
            let child = Child(pid: pid, slot: slot, generation: generation, linkFD: masterEnd, startedAt: now)
            children[pid] = child
            table.childStarted(pid, slot: slot, generation: generation, at: now)
            book.started(role: slot.role.rawValue, slot: slot.index)
            logger.info("child started", metadata: metadata(child))
        } catch {
            logger.error("cannot start child", metadata: ["role": "\(slot.role.rawValue)", "slot": "\(slot.index)", "error": "\(error)"])
            table.startFailed(slot: slot, at: monotonicSeconds())
        }
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
            guard let exit = table.childExited(pid, at: monotonicSeconds()) else { continue }
            var fields = metadata(child)
            fields["status"] = "\(status)"
            fields["uptime_s"] = "\((exit.uptime * 10).rounded() / 10)"
            let role = child.slot.role.rawValue, slot = child.slot.index
            switch exit.verdict {
            case .retired:
                logger.info("child exited", metadata: fields)
            case .notReplaced:
                logger.warning("child exited", metadata: fields)
            case .restart(let delay):
                logger.warning("child exited", metadata: fields)
                book.restarted(role: role, slot: slot)
                logger.info("child restarting", metadata: ["role": "\(role)", "slot": "\(slot)", "in_ms": "\(Int(delay * 1000))"])
            case .crashLoop(let delay, let exits, let isNew):
                logger.warning("child exited", metadata: fields)
                book.restarted(role: role, slot: slot)
                if isNew {
                    logger.error("child crash-looping", metadata: [
                        "role": "\(role)", "slot": "\(slot)", "exits": "\(exits)", "last_status": "\(status)",
                        "next_attempt_ms": "\(Int(delay * 1000))",
                    ])
                }
            }
            // A crash-looping slot's socket would keep taking its share of connections
            // with nobody to accept them; closing it lets the kernel route to live workers.
            perform(exit.actions)
        }
    }

    /// A child whose heartbeat stopped (a stuck event loop) is killed and then replaced.
    private func murderUnresponsive() {
        perform(table.watchdog(at: monotonicSeconds()))
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
        let sinceLast = now - (table.heard(from: child.pid, at: now) ?? now)
        switch message {
        case .ready:
            // Once a slot's new-generation child serves, its predecessors drain.
            let retirements = table.childReady(child.pid, at: now)
            logger.info("child ready", metadata: metadata(child))
            perform(retirements)
        case .heartbeat(let stats):
            if sinceLast > 0.05 {
                child.rates = (Double(stats.messagesIn - child.stats.messagesIn) / sinceLast,
                               Double(stats.messagesOut - child.stats.messagesOut) / sinceLast)
            }
            child.latencyIncrease = BusLatency.increase(from: child.stats.busLatencyBuckets, to: stats.busLatencyBuckets)
            child.stats = stats
            book.record(stats, role: child.slot.role.rawValue, slot: child.slot.index, pid: child.pid)
            table.childHeartbeat(child.pid, at: now)
        case .rooms(let id, let rooms):
            pendingRooms.removeValue(forKey: id)?(ControlResponse(ok: true, rooms: withDelivery(rooms)))
        case .stop, .kick, .roomsRequest:
            logger.warning("child sent a master-only message", metadata: metadata(child))
        }
    }

    // MARK: status and metrics

    /// The relay counts a room's members and rate; the workers know how they write it.
    private func withDelivery(_ rooms: [RoomStat]) -> [RoomStat] {
        let coalesced = GatheringRoom.merged(children.values.filter { $0.slot.role == .worker }.flatMap(\.stats.gatheringRooms))
        return rooms.map { room in
            var room = room
            room.delivery = coalesced[room.room] == nil ? "immediate" : "coalesced"
            room.framesPerWrite = coalesced[room.room]?.framesPerWrite
            return room
        }
    }

    private func statusReport() -> StatusReport {
        let now = monotonicSeconds()
        var reports = children.values.map { child in
            var report = ChildReport(
                role: child.slot.role.rawValue, slot: child.slot.index, pid: child.pid, generation: child.generation,
                state: (table.children[child.pid]?.state ?? .starting).name, uptimeSeconds: now - child.startedAt,
                restarts: table.slots[child.slot]?.policy.totalRestarts ?? 0,
                connections: child.stats.connections, rooms: child.stats.rooms,
                messagesInPerSecond: child.rates.messagesIn, messagesOutPerSecond: child.rates.messagesOut,
                rssBytes: child.stats.residentBytes)
            if child.slot.role == .archiver {
                report.archiveBacklog = child.stats.archiveBacklog
                report.archiveLost = child.stats.archiveLost
            }
            return report
        }
        for (slot, record) in table.slots where record.policy.isCrashLooping && !children.values.contains(where: { $0.slot == slot }) {
            reports.append(ChildReport(role: slot.role.rawValue, slot: slot.index, pid: 0, generation: record.generation,
                                       state: "crash-looping", uptimeSeconds: 0, restarts: record.policy.totalRestarts,
                                       connections: 0, rooms: 0, messagesInPerSecond: 0, messagesOutPerSecond: 0, rssBytes: 0))
        }
        reports.sort { ($0.role, $0.slot, $0.generation) < ($1.role, $1.slot, $1.generation) }
        var report = StatusReport(
            masterPid: getpid(), uptimeSeconds: now - startedAt, version: Self.version, configPath: configPath,
            generation: table.generation, listen: "\(settings.host):\(boundPort)",
            wantedWorkers: table.workerCount, lastReload: lastReload,
            watchdogKills: watchdogKills, children: reports)
        report.busLatency = busLatency()
        return report
    }

    /// Quantiles of all workers' round trips together (quantiles of each cannot be combined).
    private func busLatency() -> LatencyReport? {
        var counts = [Int](repeating: 0, count: BusLatency.bucketBounds.count + 1)
        for child in children.values where child.slot.role == .worker {
            for (index, count) in child.latencyIncrease.enumerated() where index < counts.count { counts[index] += count }
        }
        guard let p50 = BusLatency.quantile(0.5, of: counts), let p99 = BusLatency.quantile(0.99, of: counts) else { return nil }
        return LatencyReport(p50Seconds: p50, p99Seconds: p99, count: counts.reduce(0, +))
    }

    private func answer(_ page: MasterPage) -> MasterAnswer {
        switch page {
        case .metrics: .ok("text/plain; version=0.0.4", Array(metricsText().utf8))
        case .statusPage: .ok("text/html; charset=utf-8", StatusPage.html)
        case .statusJSON: .ok("application/json", ControlServer.encode(statusSnapshot()))
        }
    }

    /// `chatctl status` with the rooms of the relay's last answer; asks it for the next poll.
    private func statusSnapshot() -> StatusSnapshot {
        if topRooms.shouldAsk(at: monotonicSeconds()) {
            handle(ControlRequest(command: .rooms, top: TopRooms.count)) { [weak self] response in self?.topRooms.answered(response) }
        }
        return StatusSnapshot(status: statusReport(), rooms: topRooms.rooms, roomsError: topRooms.error)
    }

    private func metricsText() -> String {
        let slots = table.slots.map { slot, record in
            MetricsBook.SlotHealth(role: slot.role.rawValue, slot: slot.index,
                                   running: children.values.contains { $0.slot == slot && table.children[$0.pid]?.state == .running },
                                   crashLooping: record.policy.isCrashLooping)
        }
        book.refreshGauges(children: children.values.map { ($0.slot.role.rawValue, $0.slot.index, $0.stats) }, slots: slots)
        return book.text()
    }

    // MARK: waiting

    private func nextWakeup() -> Double {
        var wake = 0.5
        let now = monotonicSeconds()
        if let due = table.nextWake(after: now) { wake = min(wake, max(0, due - now)) }
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

    /// Binds `count` SO_REUSEPORT sockets for worker slots on `host:port`: the one place a
    /// slot's socket is bound (at start-up, on a reload to a new address, and for a slot
    /// that has none). `checkAvailable` first fails if anyone else holds the address, which
    /// a reuseport bind would silently join. Port 0 takes the first socket's port for all.
    /// On failure none stays open.
    private static func bindSlotSockets(_ count: Int, host: String, port: Int, backlog: Int32,
                                        checkAvailable: Bool) throws(SystemError) -> (sockets: [Int32], port: Int) {
        var port = port
        var sockets: [Int32] = []
        do {
            if checkAvailable { try ListeningSocket.checkAvailable(host: host, port: port) }
            for _ in 0..<count {
                let fd = try ListeningSocket.bind(host: host, port: port, backlog: backlog, reusePort: true)
                if port == 0 { port = ListeningSocket.localPort(fd) }
                sockets.append(fd)
            }
        } catch {
            sockets.forEach { close($0) }
            throw error
        }
        return (sockets, port)
    }

    private func metadata(_ child: Child) -> Logger.Metadata {
        ["role": "\(child.slot.role.rawValue)", "slot": "\(child.slot.index)", "pid": "\(child.pid)", "generation": "\(child.generation)"]
    }
}
