#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import ChatMaster

/// Plays the arbiter around a `SlotTable`: performs its starts with made-up pids (and
/// made-up descriptors when a slot's socket must be bound first), at a clock it sets.
private struct Harness {
    static let rules = SlotTable.Rules(
        restart: RestartPolicy.Settings(initialDelay: 0.1, maximumDelay: 5, stableAfter: 30, crashLoopAfter: 5),
        drainTimeout: 10, heartbeatTimeout: 2, startTimeout: 10)

    var table: SlotTable
    var now = 0.0
    var nextPid: pid_t = 100
    var nextSocket: Int32 = 50

    /// `workers` workers on sockets 10, 11, ...; started and ready at time 0.
    init(workers: Int, relay: Bool = false, archiver: Bool = false) {
        table = SlotTable(rules: Self.rules, workers: workers, relay: relay, archiver: archiver,
                          sockets: (0..<workers).map { Int32(10 + $0) }, at: 0)
        converge()
        for pid in table.children.keys { _ = table.childReady(pid, at: 0) }
    }

    /// One converge turn at `now`, performing its starts.
    @discardableResult
    mutating func converge() -> [SlotTable.Action] {
        let actions = table.converge(at: now)
        for case .start(let slot, let generation, let socket) in actions {
            if socket == .bindFirst {
                table.adopt(socket: nextSocket, for: slot)
                nextSocket += 1
            }
            table.childStarted(nextPid, slot: slot, generation: generation, at: now)
            nextPid += 1
        }
        return actions
    }

    /// The slot's current child.
    func pid(_ slot: SlotID) -> pid_t {
        switch table.slots[slot]?.state {
        case .serving(let pid), .recovering(let pid): return pid
        default: return -1
        }
    }

    /// The slot's child exits at `now`.
    mutating func exit(_ slot: SlotID) -> SlotTable.Exit? {
        table.childExited(pid(slot), at: now)
    }

    /// The slot's child exits `uptime` after it started; the next one starts when due.
    mutating func crash(_ slot: SlotID, after uptime: Double) -> SlotTable.Exit? {
        now += uptime
        let exit = exit(slot)
        if let due = table.slots[slot]?.state.startsAt { now = max(now, due) }
        converge()
        return exit
    }
}

private func worker(_ index: Int) -> SlotID { SlotID(role: .worker, index: index) }
private let relay = SlotID(role: .relay, index: 0)
private let archiver = SlotID(role: .archiver, index: 0)

@Suite struct SlotTableTests {
    @Test func everySlotStartsOnceOnItsOwnSocket() {
        var table = SlotTable(rules: Harness.rules, workers: 2, relay: true, archiver: true, sockets: [10, 11], at: 0)
        #expect(table.converge(at: 0) == [
            .start(archiver, generation: 1, socket: .none),
            .start(relay, generation: 1, socket: .none),
            .start(worker(0), generation: 1, socket: .slot(10)),
            .start(worker(1), generation: 1, socket: .slot(11)),
        ])
        table.childStarted(100, slot: worker(0), generation: 1, at: 0)
        #expect(table.slots[worker(0)]?.state == .serving(100))
        #expect(table.converge(at: 1).count == 3, "worker 0 started twice")
    }

    @Test func crashRestartsAfterTheBackoffOnTheKeptSocket() {
        var h = Harness(workers: 2)
        let survivor = h.pid(worker(1))
        h.now = 1
        let exit = h.exit(worker(0))
        #expect(exit == SlotTable.Exit(uptime: 1, verdict: .restart(after: 0.1), actions: []))
        #expect(h.table.slots[worker(0)]?.state == .waiting(until: 1.1))
        #expect(h.table.nextWake(after: h.now) == 1.1)
        h.now = 1.05
        #expect(h.converge() == [])
        h.now = 1.1
        #expect(h.converge() == [.start(worker(0), generation: 1, socket: .slot(10))])
        #expect(h.table.nextWake(after: h.now) == nil)
        #expect(h.pid(worker(1)) == survivor)
    }

    @Test func backoffDoublesThenResetsAfterAStableRun() {
        var h = Harness(workers: 1)
        let delays = (0..<4).map { _ in h.crash(worker(0), after: 1)?.verdict }
        #expect(delays == [.restart(after: 0.1), .restart(after: 0.2), .restart(after: 0.4), .restart(after: 0.8)])
        // Up 30 s, ready, heartbeating: its slot's failures are forgiven.
        let pid = h.pid(worker(0))
        _ = h.table.childReady(pid, at: h.now)
        h.table.childHeartbeat(pid, at: h.now + 29)
        #expect(h.table.slots[worker(0)]?.policy.consecutiveFailures == 4, "forgiven before stableAfter")
        h.table.childHeartbeat(pid, at: h.now + 30)
        #expect(h.table.slots[worker(0)]?.policy.consecutiveFailures == 0)
        #expect(h.crash(worker(0), after: 31)?.verdict == .restart(after: 0.1))
        // An exit after a long uptime is forgiven by itself, heartbeat or not.
        #expect(h.crash(worker(0), after: 1)?.verdict == .restart(after: 0.2))
        #expect(h.crash(worker(0), after: 40)?.verdict == .restart(after: 0.1))
    }

    @Test func crashLoopIsReportedOnceClosesTheSocketAndRebindsForTheNextAttempt() {
        var h = Harness(workers: 2)
        for _ in 0..<4 { #expect(h.crash(worker(0), after: 0.5)?.actions == []) }
        h.now += 0.5
        let fifth = h.exit(worker(0))
        #expect(fifth?.verdict == .crashLoop(after: 1.6, exits: 5, isNew: true))
        #expect(fifth?.actions == [.closeSocket(10)])
        #expect(h.table.slots[worker(0)]?.state == .crashLooping(until: h.now + 1.6))
        #expect(h.table.slots[worker(0)]?.socket == nil)
        #expect(h.table.slots[worker(1)]?.socket == 11, "the other slot's socket was touched")
        h.now += 1.6
        #expect(h.converge() == [.start(worker(0), generation: 1, socket: .bindFirst)])
        #expect(h.table.slots[worker(0)]?.socket == 50)
        #expect(h.table.slots[worker(0)]?.state == .recovering(h.pid(worker(0))))
        // Still looping: not reported again, the new socket closed again.
        h.now += 0.5
        let sixth = h.exit(worker(0))
        #expect(sixth?.verdict == .crashLoop(after: 3.2, exits: 6, isNew: false))
        #expect(sixth?.actions == [.closeSocket(50)])
    }

    @Test func aStableChildEndsTheCrashLoop() {
        var h = Harness(workers: 1)
        for _ in 0..<5 { _ = h.crash(worker(0), after: 0.5) }
        let pid = h.pid(worker(0))
        #expect(h.table.slots[worker(0)]?.state == .recovering(pid))
        _ = h.table.childReady(pid, at: h.now)
        h.table.childHeartbeat(pid, at: h.now + 30)
        #expect(h.table.slots[worker(0)]?.state == .serving(pid))
        #expect(h.crash(worker(0), after: 31)?.verdict == .restart(after: 0.1))
        // The next crash loop is a new one, reported again.
        for _ in 0..<3 { _ = h.crash(worker(0), after: 0.5) }
        #expect(h.crash(worker(0), after: 0.5)?.verdict == .crashLoop(after: 1.6, exits: 5, isNew: true))
    }

    @Test func aFailedStartBacksOffWithoutTouchingTheSocket() {
        var table = SlotTable(rules: Harness.rules, workers: 1, relay: false, archiver: false, sockets: [10], at: 0)
        #expect(table.converge(at: 0) == [.start(worker(0), generation: 1, socket: .slot(10))])
        #expect(table.startFailed(slot: worker(0), at: 0) == 0.1)
        #expect(table.slots[worker(0)] == SlotTable.Slot(generation: 1, policy: table.slots[worker(0)]!.policy,
                                                         state: .waiting(until: 0.1), socket: 10))
        #expect(table.converge(at: 0.05) == [])
        #expect(table.converge(at: 0.1) == [.start(worker(0), generation: 1, socket: .slot(10))])
    }

    @Test func reloadStartsTheNewGenerationAndDrainsTheOldOnlyOnceTheNewIsReady() {
        var h = Harness(workers: 2, relay: true)
        let old0 = h.pid(worker(0)), old1 = h.pid(worker(1)), oldRelay = h.pid(relay)
        h.now = 5
        #expect(h.table.reload(rules: Harness.rules, workers: 2, replacing: [:], sockets: nil, at: h.now) == [])
        #expect(h.table.generation == 2)
        #expect(h.converge() == [
            .start(worker(0), generation: 2, socket: .slot(10)),
            .start(worker(1), generation: 2, socket: .slot(11)),
        ])
        let new0 = h.pid(worker(0)), new1 = h.pid(worker(1))
        #expect(h.table.children[old0]?.state == .running, "drained before its successor is ready")
        #expect(h.table.childReady(new0, at: 6) == [.drain(old0, reason: .reload, windowMs: 8000, keepAccepting: false)])
        #expect(h.table.children[old1]?.state == .running, "slot 1 drained for slot 0's successor")
        // The new worker 1 dies before it is ready: it is restarted; the old one serves on.
        #expect(h.table.childExited(new1, at: 6.5)?.verdict == .restart(after: 0.1))
        h.now = 7
        #expect(h.converge() == [.start(worker(1), generation: 2, socket: .slot(11))])
        #expect(h.table.childReady(h.pid(worker(1)), at: 7.5) == [.drain(old1, reason: .reload, windowMs: 8000, keepAccepting: false)])
        // The drained ones leave without a restart; the relay was kept.
        #expect(h.table.childExited(old0, at: 8)?.verdict == .retired)
        #expect(h.table.childExited(old1, at: 8)?.verdict == .retired)
        h.now = 9
        #expect(h.converge() == [])
        #expect(h.pid(relay) == oldRelay)
    }

    @Test func reloadAppliesNewRestartSettingsToEverySlotKeepingItsHistory() {
        var h = Harness(workers: 1, relay: true)
        #expect(h.crash(worker(0), after: 1)?.verdict == .restart(after: 0.1))
        var slower = Harness.rules
        slower.restart.initialDelay = 1
        slower.restart.maximumDelay = 60
        _ = h.table.reload(rules: slower, workers: 1, replacing: [:], sockets: nil, at: h.now)
        h.converge()
        // The slot's second exit in a row: twice the new initial delay.
        #expect(h.crash(worker(0), after: 1)?.verdict == .restart(after: 2))
        #expect(h.crash(relay, after: 1)?.verdict == .restart(after: 1), "the kept relay's slot had the old settings")
    }

    @Test func aNewGenerationThatKeepsCrashingBacksOffWhileTheOldOneServes() {
        var h = Harness(workers: 1)
        let old = h.pid(worker(0))
        h.now = 40
        _ = h.table.reload(rules: Harness.rules, workers: 1, replacing: [:], sockets: nil, at: h.now)
        h.converge()
        var verdicts: [SlotTable.ExitVerdict?] = []
        for _ in 0..<5 {
            // The old worker, up long past stableAfter, keeps serving and heartbeating.
            h.table.childHeartbeat(old, at: h.now)
            verdicts.append(h.crash(worker(0), after: 0.5)?.verdict)
        }
        #expect(verdicts == [.restart(after: 0.1), .restart(after: 0.2), .restart(after: 0.4), .restart(after: 0.8),
                             .crashLoop(after: 1.6, exits: 5, isNew: true)])
        #expect(h.table.children[old]?.state == .running, "the old generation stopped serving")
    }

    @Test func reloadToANewAddressSwapsEverySlotsSocket() {
        var h = Harness(workers: 2)
        let actions = h.table.reload(rules: Harness.rules, workers: 3, replacing: [:], sockets: [20, 21, 22], at: 1)
        #expect(actions == [.closeSocket(10), .closeSocket(11)])
        h.now = 1
        #expect(h.converge() == [
            .start(worker(0), generation: 2, socket: .slot(20)),
            .start(worker(1), generation: 2, socket: .slot(21)),
            .start(worker(2), generation: 2, socket: .slot(22)),
        ])
    }

    @Test func reloadReplacesAChangedSingletonOnlyOnceTheOldOneIsGone() {
        var h = Harness(workers: 1, relay: true, archiver: true)
        let oldRelay = h.pid(relay), oldArchiver = h.pid(archiver)
        h.now = 1
        let actions = h.table.reload(rules: Harness.rules, workers: 1, replacing: [.relay: true, .archiver: false], sockets: nil, at: h.now)
        #expect(actions == [
            .drain(oldRelay, reason: .shutdown, windowMs: 0, keepAccepting: false),
            .drain(oldArchiver, reason: .shutdown, windowMs: 0, keepAccepting: false),
        ])
        #expect(h.table.slots[archiver] == nil)
        #expect(h.converge() == [.start(worker(0), generation: 2, socket: .slot(10))], "a second relay started")
        #expect(h.table.nextWake(after: h.now) == nil, "the relay's start, held back, counted as due: a busy poll")
        #expect(h.table.childExited(oldRelay, at: 1.2)?.verdict == .retired)
        #expect(h.table.childExited(oldArchiver, at: 1.2)?.verdict == .retired)
        h.now = 1.2
        #expect(h.converge() == [.start(relay, generation: 2, socket: .none)])
    }

    @Test func scaleUpAddsSlotsThatBindTheirOwnSocket() {
        var h = Harness(workers: 1)
        let first = h.pid(worker(0))
        #expect(h.table.scale(to: 3, at: 1) == [])
        #expect(h.table.workerCount == 3)
        h.now = 1
        #expect(h.converge() == [
            .start(worker(1), generation: 1, socket: .bindFirst),
            .start(worker(2), generation: 1, socket: .bindFirst),
        ])
        #expect(h.table.slots[worker(1)]?.socket == 50)
        #expect(h.table.slots[worker(2)]?.socket == 51)
        #expect(h.pid(worker(0)) == first)
    }

    @Test func scaleDownDrainsTheRemovedSlotsWhichKeepAccepting() {
        var h = Harness(workers: 3)
        let kept = h.pid(worker(0)), gone1 = h.pid(worker(1)), gone2 = h.pid(worker(2))
        #expect(h.table.scale(to: 1, at: 1) == [
            .closeSocket(11), .drain(gone1, reason: .reload, windowMs: 8000, keepAccepting: true),
            .closeSocket(12), .drain(gone2, reason: .reload, windowMs: 8000, keepAccepting: true),
        ])
        #expect(h.table.workerCount == 1)
        #expect(h.table.childExited(gone1, at: 3)?.verdict == .retired)
        h.now = 4
        #expect(h.converge() == [])
        #expect(h.pid(worker(0)) == kept)
        #expect(h.table.scale(to: 0, at: 4) == nil)
        #expect(h.table.scale(to: 257, at: 4) == nil)
        // Back up while the removed child still drains: the slot gets a new child and socket.
        #expect(h.table.scale(to: 3, at: 5) == [])
        h.now = 5
        #expect(h.converge() == [
            .start(worker(1), generation: 1, socket: .bindFirst),
            .start(worker(2), generation: 1, socket: .bindFirst),
        ])
        #expect(h.table.childExited(gone2, at: 6)?.verdict == .retired)
    }

    @Test func stopDrainsTheWorkersThenTheSingletonsAndKillsAtTheDeadline() {
        var h = Harness(workers: 2, relay: true, archiver: true)
        let w0 = h.pid(worker(0)), w1 = h.pid(worker(1)), r = h.pid(relay), a = h.pid(archiver)
        #expect(h.table.beginStop(.drain, at: 5) == [
            .closeSocket(10), .closeSocket(11),
            .drain(w0, reason: .drain, windowMs: 8000, keepAccepting: false),
            .drain(w1, reason: .drain, windowMs: 8000, keepAccepting: false),
        ])
        #expect(h.table.isStopping)
        #expect(h.table.beginStop(.shutdown, at: 5) == nil)
        #expect(h.table.scale(to: 4, at: 5) == nil)
        #expect(h.table.reload(rules: Harness.rules, workers: 4, replacing: [:], sockets: nil, at: 5) == [])
        #expect(h.table.generation == 1)
        #expect(h.table.converge(at: 6) == [], "relay drained while workers still run")
        #expect(h.table.childExited(w0, at: 6)?.verdict == .retired)
        #expect(h.table.childExited(w1, at: 7)?.verdict == .retired)
        #expect(h.table.converge(at: 7) == [
            .drain(a, reason: .shutdown, windowMs: 0, keepAccepting: false),
            .drain(r, reason: .shutdown, windowMs: 0, keepAccepting: false),
        ])
        #expect(h.table.converge(at: 14.9) == [])
        #expect(h.table.converge(at: 15) == [.kill(a, .stopTimedOut), .kill(r, .stopTimedOut)])
        #expect(!h.table.isFinished)
        _ = h.table.childExited(a, at: 15)
        _ = h.table.childExited(r, at: 15)
        #expect(h.table.isFinished)
    }

    @Test func aStopWakesTheLoopOnlyForItsDeadline() {
        var h = Harness(workers: 2)
        h.now = 1
        #expect(h.exit(worker(0))?.verdict == .restart(after: 0.1))
        _ = h.table.beginStop(.drain, at: 1.5)
        // The crashed slot's restart would have been due at 1.1; no restart comes while stopping.
        #expect(h.table.nextWake(after: 2) == 11.5)
        #expect(h.table.converge(at: 2) == [])
        #expect(h.table.nextWake(after: 11.5) == nil, "the kills at the deadline are sent once it passes")
    }

    @Test func aChildDyingWhileTheMasterStopsIsNotReplaced() {
        var h = Harness(workers: 1, relay: true)
        _ = h.table.beginStop(.shutdown, at: 1)
        #expect(h.table.childExited(h.pid(relay), at: 1.5)?.verdict == .notReplaced)
        #expect(h.table.converge(at: 2) == [])
        #expect(h.table.slots[relay]?.policy.totalRestarts == 0)
    }

    @Test func watchdogKillsASilentChildAndItsSlotRestarts() {
        var h = Harness(workers: 2)
        let silent = h.pid(worker(0)), chatty = h.pid(worker(1))
        #expect(h.table.heard(from: silent, at: 1) == 0)
        for t in [1.0, 2, 3, 3.5] { _ = h.table.heard(from: chatty, at: t) }
        #expect(h.table.watchdog(at: 2.9) == [])
        #expect(h.table.watchdog(at: 3.5) == [.kill(silent, .unresponsive(silentFor: 2.5))])
        #expect(h.table.watchdog(at: 3.6) == [], "killed once per timeout")
        h.now = 3.7
        #expect(h.exit(worker(0))?.verdict == .restart(after: 0.1))
        h.now = 3.9
        #expect(h.converge() == [.start(worker(0), generation: 1, socket: .slot(10))])
        #expect(h.pid(worker(1)) == chatty)
    }

    @Test func watchdogKillsAChildThatNeverGetsReadyAndADrainedOneOverstaying() {
        var table = SlotTable(rules: Harness.rules, workers: 1, relay: false, archiver: false, sockets: [10], at: 0)
        _ = table.converge(at: 0)
        table.childStarted(100, slot: worker(0), generation: 1, at: 0)
        #expect(table.watchdog(at: 10) == [])
        #expect(table.watchdog(at: 10.5) == [.kill(100, .unresponsive(silentFor: 10.5))])
        #expect(table.beginStop(.drain, at: 11)?.last == .drain(100, reason: .drain, windowMs: 8000, keepAccepting: false))
        #expect(table.watchdog(at: 21) == [])
        #expect(table.watchdog(at: 21.5) == [.kill(100, .drainOverdue)])
        #expect(table.watchdog(at: 22) == [.kill(100, .drainOverdue)], "until it is reaped")
    }
}
