#if canImport(Glibc)
import Glibc
#endif
import ChatConfig
import ChatLink

/// The master's slots and children, and every decision about them, as a value. The
/// arbiter tells it what happened (a child started, said ready, sent a heartbeat, exited;
/// a reload, a scale, a stop), with the time it happened, and performs the `Action`s it
/// returns: start a child, drain or kill one, close a slot's socket. Nothing here reads a
/// clock, signals a process or opens a descriptor, so every transition is unit-tested.
///
/// Data structures:
/// - `slots`: one `Slot` per place in the wanted set ("worker 1", "relay 0"). A slot
///   outlives its children: it keeps their restart policy, the config generation its child
///   must run, its `SlotState`, and (workers) its SO_REUSEPORT socket, kept across
///   restarts and reloads so that connections queued on it wait for the next child.
/// - `children`: every child spawned and not yet reaped, with its own `ChildState`. A slot
///   may have several for a while: the old generation drains after its successor is
///   ready, and a removed slot's child drains after the slot is gone.
/// - `phase`: running, or stopping with a deadline after which every child is killed.
struct SlotTable {
    /// The supervisor's timing, from the current config generation.
    struct Rules: Equatable {
        var restart: RestartPolicy.Settings
        var drainTimeout: Double
        var heartbeatTimeout: Double
        /// A child that has not said `ready` by then is killed and restarted.
        var startTimeout: Double
    }

    /// Where a slot stands with its child of the slot's generation.
    enum SlotState: Equatable {
        /// None is alive; the next starts at `until` (at once when it has passed).
        case waiting(until: Double)
        /// As `waiting`, after `crashLoopAfter` quick exits in a row: reported once, and its
        /// socket closed meanwhile, so that the kernel sends its share of connections to
        /// the live workers. Re-bound for the next attempt.
        case crashLooping(until: Double)
        /// `pid` is the slot's child.
        case serving(pid_t)
        /// `pid` is the slot's child after a crash loop; `serving` once it has been up
        /// `stableAfter` (an exit before that continues the crash loop, not reported again).
        case recovering(pid_t)

        /// When the next child may start, while the slot has none.
        var startsAt: Double? {
            switch self {
            case .waiting(let until), .crashLooping(let until): until
            case .serving, .recovering: nil
            }
        }

        /// In a crash loop that has been reported and has not ended yet.
        var isInCrashLoop: Bool {
            switch self {
            case .crashLooping, .recovering: true
            case .waiting, .serving: false
            }
        }

        /// The state that starts a child of a new generation at once.
        func startingOver(at now: Double) -> SlotState {
            isInCrashLoop ? .crashLooping(until: now) : .waiting(until: now)
        }
    }

    struct Slot: Equatable {
        /// The config generation the slot's child must run; a child of an older one is
        /// replaced (drained once its successor is ready).
        var generation: Int
        var policy: RestartPolicy
        var state: SlotState
        /// Workers only; nil until bound, and while crash-looping.
        var socket: Int32?
    }

    /// One child process spawned and not reaped yet.
    struct ChildRecord: Equatable {
        let slot: SlotID
        let generation: Int
        let startedAt: Double
        var state: ChildState = .starting
        /// The last line on its link (or the last watchdog kill: one kill per timeout).
        var lastHeard: Double

        var isDraining: Bool {
            if case .draining = state { return true }
            return false
        }
    }

    /// The listening socket a new child gets.
    enum ChildSocket: Equatable {
        /// Relay and archiver: none.
        case none
        /// The slot's own socket.
        case slot(Int32)
        /// The slot has none (new, or closed in a crash loop): bind one, give it to the
        /// table with `adopt(socket:for:)`, then start the child on it.
        case bindFirst
    }

    enum KillCause: Equatable {
        /// Its heartbeat stopped (or it never said ready): the watchdog.
        case unresponsive(silentFor: Double)
        /// Still alive at its drain deadline.
        case drainOverdue
        /// Still alive when the master's stop ran out of time.
        case stopTimedOut
    }

    enum Action: Equatable {
        /// Start a child in `slot` running `generation`; report `childStarted` or `startFailed`.
        case start(SlotID, generation: Int, socket: ChildSocket)
        /// Ask a child to say goodbye (over `windowMs`) and exit.
        case drain(pid_t, reason: StopReason, windowMs: Int, keepAccepting: Bool)
        case kill(pid_t, KillCause)
        case closeSocket(Int32)
    }

    /// What a child's exit means for its slot.
    enum ExitVerdict: Equatable {
        /// It was draining, or its slot moved on (a new generation, scaled away).
        case retired
        /// It died while the master stops: not replaced.
        case notReplaced
        /// Its successor starts after `delay` seconds.
        case restart(after: Double)
        /// As `restart`, the slot crash-looping after `exits` quick exits in a row;
        /// `isNew` on the first exit of this crash loop, the one to report.
        case crashLoop(after: Double, exits: Int, isNew: Bool)
    }

    struct Exit: Equatable {
        var uptime: Double
        var verdict: ExitVerdict
        var actions: [Action]
    }

    private enum Phase: Equatable {
        case running
        case stopping(reason: StopReason, deadline: Double)
    }

    private(set) var rules: Rules
    private(set) var generation = 1
    private(set) var slots: [SlotID: Slot] = [:]
    private(set) var children: [pid_t: ChildRecord] = [:]
    private var phase = Phase.running

    /// The slots of generation 1: `workers` workers on `sockets` (by slot index), and the
    /// relay and the archiver when wanted. Their children start at the first `converge`.
    init(rules: Rules, workers: Int, relay: Bool, archiver: Bool, sockets: [Int32], at now: Double) {
        self.rules = rules
        if relay { slots[SlotID(role: .relay, index: 0)] = newSlot(at: now) }
        if archiver { slots[SlotID(role: .archiver, index: 0)] = newSlot(at: now) }
        _ = applyWorkerCount(workers, sockets: sockets, at: now)
    }

    var workerCount: Int { slots.keys.filter { $0.role == .worker }.count }
    var isStopping: Bool { phase != .running }
    /// Stopping, and every child is gone: the master may exit.
    var isFinished: Bool { isStopping && children.isEmpty }

    /// The next time the table has something to do by the clock: a start falling due, or
    /// the stop's deadline while it is ahead. A start held back until a predecessor exits
    /// is not one (the exit wakes the loop through SIGCHLD), and neither is a start while
    /// stopping (none comes) nor a deadline passed (its kills are sent): counting those,
    /// already due, made the loop poll without sleeping.
    func nextWake(after now: Double) -> Double? {
        switch phase {
        case .stopping(_, let deadline):
            return deadline > now ? deadline : nil
        case .running:
            return slots.filter { !waitsForPredecessor($0.key) }.compactMap(\.value.state.startsAt).min()
        }
    }

    /// One relay (archiver) at a time: a replaced one must let go of its socket, journal or
    /// database before its successor starts.
    private func waitsForPredecessor(_ id: SlotID) -> Bool {
        id.role != .worker && children.values.contains { $0.slot == id }
    }

    // MARK: the children's lives

    /// A slot's socket, bound for a `.start(_, _, .bindFirst)`.
    mutating func adopt(socket: Int32, for slot: SlotID) {
        slots[slot]?.socket = socket
    }

    mutating func childStarted(_ pid: pid_t, slot id: SlotID, generation: Int, at now: Double) {
        children[pid] = ChildRecord(slot: id, generation: generation, startedAt: now, lastHeard: now)
        guard var slot = slots[id] else { return }
        slot.state = slot.state.isInCrashLoop ? .recovering(pid) : .serving(pid)
        slots[id] = slot
    }

    /// A start that failed counts as an exit right after starting; returns the delay
    /// before the next attempt.
    @discardableResult
    mutating func startFailed(slot id: SlotID, at now: Double) -> Double? {
        guard var slot = slots[id] else { return nil }
        let delay = slot.policy.recordExit(uptime: 0)
        slot.state = slot.state.isInCrashLoop ? .crashLooping(until: now + delay) : .waiting(until: now + delay)
        slots[id] = slot
        return delay
    }

    /// Any line on the child's link. Returns when it was last heard from before.
    mutating func heard(from pid: pid_t, at now: Double) -> Double? {
        defer { children[pid]?.lastHeard = now }
        return children[pid]?.lastHeard
    }

    /// The child serves. A worker's predecessors in its slot (older generations) drain.
    mutating func childReady(_ pid: pid_t, at now: Double) -> [Action] {
        guard let child = children[pid] else { return [] }
        if child.state == .starting { children[pid]?.state = .running }
        guard child.slot.role == .worker else { return [] }
        return sortedChildren.compactMap { old, older in
            older.slot == child.slot && older.generation < child.generation
                ? drain(old, reason: .reload, keepAccepting: false, at: now) : nil
        }
    }

    /// A child of its slot's generation running for `stableAfter` clears the slot's
    /// failures, and ends a crash loop. (An older generation still serving through a reload
    /// says nothing about its successors: with it counted, a new generation that kept
    /// crashing was restarted every 100 ms and never reported.)
    mutating func childHeartbeat(_ pid: pid_t, at now: Double) {
        guard let child = children[pid], child.state == .running,
              now - child.startedAt >= rules.restart.stableAfter, var slot = slots[child.slot],
              child.generation == slot.generation else { return }
        slot.policy.recordStable()
        switch slot.state {
        case .recovering(let current): slot.state = .serving(current)
        case .crashLooping(let until): slot.state = .waiting(until: until)
        case .waiting, .serving: break
        }
        slots[child.slot] = slot
    }

    /// The child was reaped. Its slot's own child (not draining, of the slot's generation)
    /// is replaced after the policy's backoff, while the master runs.
    mutating func childExited(_ pid: pid_t, at now: Double) -> Exit? {
        guard let child = children.removeValue(forKey: pid) else { return nil }
        var exit = Exit(uptime: now - child.startedAt, verdict: .retired, actions: [])
        guard var slot = slots[child.slot], slot.generation == child.generation, !child.isDraining else { return exit }
        guard phase == .running else {
            exit.verdict = .notReplaced
            return exit
        }
        let delay = slot.policy.recordExit(uptime: exit.uptime)
        if slot.policy.isCrashLooping {
            exit.verdict = .crashLoop(after: delay, exits: slot.policy.consecutiveFailures, isNew: !slot.state.isInCrashLoop)
            slot.state = .crashLooping(until: now + delay)
            if let fd = slot.socket {
                exit.actions.append(.closeSocket(fd))
                slot.socket = nil
            }
        } else {
            exit.verdict = .restart(after: delay)
            slot.state = .waiting(until: now + delay)
        }
        slots[child.slot] = slot
        return exit
    }

    // MARK: the loop's turns

    /// Kills the children that stopped answering, and the drained ones past their deadline.
    mutating func watchdog(at now: Double) -> [Action] {
        var actions: [Action] = []
        for (pid, child) in sortedChildren {
            switch child.state {
            case .starting where now - child.startedAt > rules.startTimeout,
                 .running where now - child.lastHeard > rules.heartbeatTimeout:
                actions.append(.kill(pid, .unresponsive(silentFor: now - child.lastHeard)))
                children[pid]?.lastHeard = now
            case .draining(let deadline) where now > deadline:
                actions.append(.kill(pid, .drainOverdue))
            default:
                break
            }
        }
        return actions
    }

    /// Running: starts the children that are due. Stopping: the relay and the archiver
    /// drain once the workers are gone, and everything is killed at the deadline.
    mutating func converge(at now: Double) -> [Action] {
        if case .stopping(_, let deadline) = phase {
            var actions = drainSingletonsIfWorkersGone(at: now)
            if now >= deadline {
                actions += sortedChildren.map { .kill($0.pid, .stopTimedOut) }
            }
            return actions
        }
        return slots.sorted(by: { Self.order($0.key, $1.key) }).compactMap { id, slot in
            guard let due = slot.state.startsAt, due <= now, !waitsForPredecessor(id) else { return nil }
            let socket: ChildSocket = id.role != .worker ? .none : slot.socket.map { .slot($0) } ?? .bindFirst
            return .start(id, generation: slot.generation, socket: socket)
        }
    }

    // MARK: reload, scale, stop

    /// A valid config was loaded: the next generation takes over slot by slot, on
    /// `sockets` when the listen address changed. `replacing` names the singletons whose
    /// settings changed, and whether each is still wanted: the current one drains, and a
    /// new one starts once it is gone.
    mutating func reload(rules: Rules, workers: Int, replacing: [ChildRole: Bool], sockets: [Int32]?,
                         at now: Double) -> [Action] {
        guard phase == .running else { return [] }
        generation += 1
        self.rules = rules
        for id in slots.keys { slots[id]?.policy.settings = rules.restart }
        var actions: [Action] = []
        if sockets != nil {
            actions += closeSockets()
        }
        actions += applyWorkerCount(workers, sockets: sockets ?? [], at: now)
        for id in slots.keys where id.role == .worker {
            startOver(id, at: now)
        }
        for role in [ChildRole.relay, .archiver] {
            guard let wanted = replacing[role] else { continue }
            let id = SlotID(role: role, index: 0)
            if wanted {
                startOver(id, at: now)
            } else {
                slots[id] = nil
            }
            actions += sortedChildren.compactMap { pid, child in
                child.slot == id ? drain(pid, reason: .shutdown, keepAccepting: false, at: now) : nil
            }
        }
        return actions
    }

    /// Runs `count` workers; nil (refused) while stopping or outside 1...maxWorkers.
    mutating func scale(to count: Int, at now: Double) -> [Action]? {
        guard phase == .running, (1...GatewayConfig.maxWorkers).contains(count) else { return nil }
        return applyWorkerCount(count, sockets: [], at: now)
    }

    /// Closes the slots' sockets (the workers hold their own copies, so the kernel
    /// refuses new connections once the last one stops accepting) and drains the workers;
    /// the relay and the archiver follow once the workers are gone. Nil if already stopping.
    mutating func beginStop(_ reason: StopReason, at now: Double) -> [Action]? {
        guard phase == .running else { return nil }
        phase = .stopping(reason: reason, deadline: now + rules.drainTimeout)
        var actions = closeSockets()
        actions += sortedChildren.compactMap { pid, child in
            child.slot.role == .worker ? drain(pid, reason: reason, keepAccepting: false, at: now) : nil
        }
        return actions + drainSingletonsIfWorkersGone(at: now)
    }

    /// Every slot's socket, closed.
    mutating func closeSockets() -> [Action] {
        slots.sorted(by: { Self.order($0.key, $1.key) }).compactMap { id, slot in
            guard let fd = slot.socket else { return nil }
            slots[id]?.socket = nil
            return .closeSocket(fd)
        }
    }

    // MARK: helpers

    private func newSlot(at now: Double) -> Slot {
        Slot(generation: generation, policy: RestartPolicy(settings: rules.restart), state: .waiting(until: now))
    }

    /// The slot (created if missing) wants a child of the current generation, at once.
    private mutating func startOver(_ id: SlotID, at now: Double) {
        var slot = slots[id] ?? newSlot(at: now)
        slot.generation = generation
        slot.state = slot.state.startingOver(at: now)
        slots[id] = slot
    }

    /// Adds or removes worker slots. A removed slot's child drains and keeps accepting
    /// what is queued on its socket until it exits (the socket goes with it).
    private mutating func applyWorkerCount(_ count: Int, sockets: [Int32], at now: Double) -> [Action] {
        var actions: [Action] = []
        for (id, slot) in slots.sorted(by: { Self.order($0.key, $1.key) }) where id.role == .worker && id.index >= count {
            slots[id] = nil
            if let fd = slot.socket { actions.append(.closeSocket(fd)) }
            actions += sortedChildren.compactMap { pid, child in
                child.slot == id ? drain(pid, reason: .reload, keepAccepting: true, at: now) : nil
            }
        }
        for index in 0..<count {
            let id = SlotID(role: .worker, index: index)
            let socket = sockets.indices.contains(index) ? sockets[index] : nil
            if slots[id] == nil {
                var slot = newSlot(at: now)
                slot.socket = socket
                slots[id] = slot
            } else if let socket {
                slots[id]?.socket = socket
            }
        }
        return actions
    }

    private mutating func drainSingletonsIfWorkersGone(at now: Double) -> [Action] {
        guard isStopping, !children.values.contains(where: { $0.slot.role == .worker }) else { return [] }
        return sortedChildren.compactMap { pid, _ in drain(pid, reason: .shutdown, keepAccepting: false, at: now) }
    }

    /// Asks a child to say goodbye and exit; it is killed if still alive at the drain
    /// timeout. Nil if it is draining already.
    private mutating func drain(_ pid: pid_t, reason: StopReason, keepAccepting: Bool, at now: Double) -> Action? {
        guard let child = children[pid], !child.isDraining else { return nil }
        children[pid]?.state = .draining(deadline: now + rules.drainTimeout)
        let windowMs = reason == .shutdown ? 0 : Int(rules.drainTimeout * 800)
        return .drain(pid, reason: reason, windowMs: windowMs, keepAccepting: keepAccepting)
    }

    /// By pid, so that the actions come in a stable order.
    private var sortedChildren: [(pid: pid_t, child: ChildRecord)] {
        children.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    private static func order(_ a: SlotID, _ b: SlotID) -> Bool {
        (a.role.rawValue, a.index) < (b.role.rawValue, b.index)
    }
}

extension SlotTable.Rules {
    init(_ settings: MasterSettings) {
        self.init(restart: settings.restart, drainTimeout: settings.drainTimeout,
                  heartbeatTimeout: settings.heartbeatTimeout, startTimeout: settings.startTimeout)
    }
}
