#if canImport(Glibc)
import Glibc
#endif
import ChatLink
import ChatSystem
import Logging

/// Everything the supervisor needs to know, resolved from the config.
public struct MasterSettings: Sendable {
    public var executable: String
    public var host: String
    public var port: Int
    public var backlog: Int32
    public var workerCount: Int
    public var restart: RestartPolicy.Settings
    public var drainTimeout: Double
    public var heartbeatTimeout: Double
    public var startTimeout: Double
    /// The resolved config as JSON, handed to every child in its environment.
    public var childConfigJSON: String
    /// The environment variable the children read it from.
    public var childConfigVariable: String

    public init(executable: String, host: String, port: Int, backlog: Int32, workerCount: Int, restart: RestartPolicy.Settings,
                drainTimeout: Double, heartbeatTimeout: Double, startTimeout: Double, childConfigJSON: String, childConfigVariable: String) {
        self.executable = executable
        self.host = host
        self.port = port
        self.backlog = backlog
        self.workerCount = workerCount
        self.restart = restart
        self.drainTimeout = drainTimeout
        self.heartbeatTimeout = heartbeatTimeout
        self.startTimeout = startTimeout
        self.childConfigJSON = childConfigJSON
        self.childConfigVariable = childConfigVariable
    }
}

/// The master's supervision loop, after gunicorn's arbiter: signals only enqueue; one
/// loop takes them, reads the children's links, reaps the dead, kills the hung, and
/// converges the live children to the wanted slots. It never touches a client.
public final class Arbiter {
    private enum Phase {
        case running
        case stopping(reason: StopReason, deadline: Double)
    }

    private var settings: MasterSettings
    private let signals: SignalQueue
    private let logger: Logger
    private var phase = Phase.running
    private var generation = 1
    private var children: [pid_t: Child] = [:]
    private var slots: [SlotID: SlotRecord] = [:]

    /// Binds the worker slots' listening sockets. Throws with the address when it is taken.
    public init(settings: MasterSettings, logger: Logger) throws(SystemError) {
        self.settings = settings
        self.logger = logger
        try ListeningSocket.checkAvailable(host: settings.host, port: settings.port)
        signals = try SignalQueue(signals: [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGCHLD])
        SignalQueue.ignore(SIGPIPE)
        slots[SlotID(role: .relay, index: 0)] = SlotRecord(policy: RestartPolicy(settings: settings.restart))
        for index in 0..<settings.workerCount {
            try addWorkerSlot(index)
        }
        logger.info("listening on \(settings.host):\(self.settings.port)", metadata: [
            "backlog": "\(settings.backlog)", "sockets": "\(settings.workerCount)",
        ])
    }

    /// Runs until a stop completes; returns the master's exit code.
    public func run() -> Int32 {
        while true {
            waitForEvents(timeout: nextWakeup())
            for signal in signals.drain() { handle(signal: signal) }
            readLinks()
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
        logger.info("stopped")
        return 0
    }

    // MARK: signals

    private func handle(signal: Int32) {
        switch signal {
        case SIGTERM, SIGINT: beginStop(.shutdown)
        case SIGQUIT: beginStop(.drain)
        case SIGCHLD: break  // reaped below
        default: logger.notice("ignoring signal", metadata: ["signal": "\(Signals.name(signal))"])
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
        let windowMs = reason == .shutdown ? 0 : Int(settings.drainTimeout * 800)
        for child in children.values where child.slot.role == .worker {
            child.send(.stop(reason: reason, windowMs: windowMs))
            child.state = .draining(deadline: deadline)
        }
        stopRelayIfWorkersGone()
    }

    /// Workers go first so that the relay can serve their last messages.
    private func advanceStop() {
        stopRelayIfWorkersGone()
        guard case .stopping(_, let deadline) = phase, monotonicSeconds() >= deadline else { return }
        for child in children.values {
            logger.warning("killing child after drain timeout", metadata: metadata(child))
            kill(child.pid, SIGKILL)
        }
    }

    private func stopRelayIfWorkersGone() {
        guard case .stopping(_, let deadline) = phase,
              !children.values.contains(where: { $0.slot.role == .worker }) else { return }
        for child in children.values where child.slot.role == .relay {
            if case .draining = child.state { continue }
            child.send(.stop(reason: .shutdown, windowMs: 0))
            child.state = .draining(deadline: deadline)
        }
    }

    // MARK: children

    private func manageChildren() {
        let now = monotonicSeconds()
        for (slot, record) in slots.sorted(by: { $0.key.index < $1.key.index }) {
            guard let due = record.nextStartAt, due <= now else { continue }
            spawn(slot)
        }
    }

    private func spawn(_ slot: SlotID) {
        guard var record = slots[slot] else { return }
        do {
            var inherit: [Spawner.Inherit] = []
            if slot.role == .worker {
                let listenFD = try record.listenFD ?? bindWorkerSocket()
                record.listenFD = listenFD
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
            environment[settings.childConfigVariable] = settings.childConfigJSON
            environment["CHATGW_MASTER_PID"] = "\(getpid())"
            let pid = try Spawner.spawn(executable: settings.executable, arguments: arguments,
                                        environment: environment, inherit: inherit)
            let child = Child(pid: pid, slot: slot, generation: generation, linkFD: masterEnd, startedAt: monotonicSeconds())
            children[pid] = child
            record.nextStartAt = nil
            logger.info("child started", metadata: metadata(child))
        } catch {
            logger.error("cannot start child", metadata: ["role": "\(slot.role.rawValue)", "slot": "\(slot.index)", "error": "\(error)"])
            record.nextStartAt = monotonicSeconds() + record.policy.recordExit(uptime: 0)
        }
        slots[slot] = record
    }

    private func reap() {
        for (pid, status) in ProcessControl.reapExited() {
            guard let child = children.removeValue(forKey: pid) else { continue }
            close(child.linkFD)
            let uptime = monotonicSeconds() - child.startedAt
            var fields = metadata(child)
            fields["status"] = "\(status)"
            fields["uptime_s"] = "\((uptime * 10).rounded() / 10)"
            let expected: Bool
            if case .draining = child.state { expected = true } else { expected = false }
            if expected { logger.info("child exited", metadata: fields) } else { logger.warning("child exited", metadata: fields) }
            guard case .running = phase, !expected, var record = slots[child.slot] else { continue }
            let delay = record.policy.recordExit(uptime: uptime)
            record.nextStartAt = monotonicSeconds() + delay
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
                logger.error("child unresponsive, killing", metadata: metadata(child))
                kill(child.pid, SIGKILL)
            case .draining(let deadline) where now > deadline:
                kill(child.pid, SIGKILL)
            default:
                break
            }
        }
    }

    // MARK: links

    private func readLinks() {
        var buffer = [UInt8](repeating: 0, count: 16_384)
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
        child.lastHeartbeat = now
        switch message {
        case .ready:
            if child.state == .starting { child.state = .running }
            logger.info("child ready", metadata: metadata(child))
        case .heartbeat(let stats):
            child.stats = stats
            if child.state == .running, now - child.startedAt >= settings.restart.stableAfter {
                slots[child.slot]?.policy.recordStable()
                slots[child.slot]?.crashLoopReported = false
            }
        case .stop:
            logger.warning("child sent a master-only message", metadata: metadata(child))
        }
    }

    // MARK: waiting

    private func nextWakeup() -> Double {
        var wake = 1.0
        let now = monotonicSeconds()
        for record in slots.values {
            if let due = record.nextStartAt { wake = min(wake, max(0, due - now)) }
        }
        return wake
    }

    private func waitForEvents(timeout: Double) {
        var fds = [pollfd(fd: signals.readFD, events: Int16(POLLIN), revents: 0)]
        for child in children.values {
            fds.append(pollfd(fd: child.linkFD, events: Int16(POLLIN), revents: 0))
        }
        _ = poll(&fds, nfds_t(fds.count), Int32(timeout * 1000))
    }

    // MARK: sockets

    private func addWorkerSlot(_ index: Int) throws(SystemError) {
        var record = SlotRecord(policy: RestartPolicy(settings: settings.restart))
        record.listenFD = try bindWorkerSocket()
        slots[SlotID(role: .worker, index: index)] = record
    }

    private func bindWorkerSocket() throws(SystemError) -> Int32 {
        let fd = try ListeningSocket.bind(host: settings.host, port: settings.port, backlog: settings.backlog, reusePort: true)
        if settings.port == 0 { settings.port = ListeningSocket.localPort(fd) }
        return fd
    }

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
