#if canImport(Glibc)
import Glibc
#endif
import ChatArchive
import ChatAuth
import ChatBus
import ChatConfig
import ChatLink
import ChatProtocol
import ChatSystem
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// One worker process: accepts on the socket the master bound for its slot and holds
/// every connection, room table and its bus link on one event loop, so nothing here
/// needs a lock and no message hops threads.
final class Worker: BusDelegate {
    let settings: WorkerSettings
    let logger: Logger
    let bus: any Bus
    let rooms: LocalRooms
    /// Set in auth mode `jwt`.
    let verifier: TokenVerifier?
    /// The archive, read for scroll-back and long resumes (nil when off or unreadable).
    let archive: (any ArchiveStore)?
    let eventLoop: any EventLoop
    /// The epoll loop's front, when it holds the client sockets (`server.engine: epoll`).
    var engine: EngineFront?
    var counters = WorkerCounters()
    /// Every open session, each knowing its place (`registryIndex`): one append and one
    /// swap-remove per connection, no hashing.
    private var sessions: ContiguousArray<SessionHandler> = []
    /// The event stream sessions among them, for their heartbeat comments.
    private var eventStreams: [ObjectIdentifier: SessionHandler] = [:]
    private var heartbeats: Scheduled<Void>?
    /// `POST /sse/send`'s rate limit per user on this worker (such a post has no session).
    var sendRates: RateTable
    private let idle = IdleTable<SessionHandler>()
    private var nextConnection: UInt64 = 0
    /// Joins and sends that came while the bus was unreachable, waiting for it to come back.
    private var waitingForBus = BusWaits<(Bool) -> Void>()
    /// Re-joins after the bus came back that are not answered yet; requests wait for them.
    private var resyncsUnanswered = 0
    /// Counts bus links, so that a re-join answered after its link was replaced is not counted.
    private var busLinks = 0
    /// The sessions' joins and leaves of this tick, sent to the bus at its end.
    private var memberRequests = MemberRequests()
    /// Scroll-back requests whose archive read failed: one warning a minute at most.
    private var archiveReadWarnings = LogPace(intervalSeconds: 60)
    private(set) var stopping = false
    private var stopReason = ByeReason.shutdown
    var onDrained: (() -> Void)?

    init(settings: WorkerSettings, bus: any Bus, verifier: TokenVerifier?, archive: (any ArchiveStore)?, eventLoop: any EventLoop, logger: Logger) {
        self.settings = settings
        self.verifier = verifier
        self.archive = archive
        self.eventLoop = eventLoop
        self.logger = logger
        self.bus = bus
        self.rooms = LocalRooms(eventLoop: eventLoop, maxDelayMs: settings.config.delivery.maxDelayMs)
        sendRates = RateTable(rate: settings.limits.ratePerSecond, burst: settings.limits.burst, capacity: Self.sendRateUsers)
        bus.delegate = self
    }

    var connectionCount: Int { sessions.count }

    /// `w<slot>-<n in hex>`, written byte by byte: every handshake makes one, and an
    /// interpolation with `String(_:radix:)` was about 1 % of a handshake. Up to 15 bytes
    /// (slots below 1,000 and the first 2^40 connections) it is a small string: no allocation.
    func makeConnectionID() -> String {
        nextConnection += 1
        return Self.connectionID(slot: settings.slot, number: nextConnection)
    }

    static func connectionID(slot: Int, number: UInt64) -> String {
        // "w", up to 20 decimal digits, "-", up to 16 hex digits.
        withUnsafeTemporaryAllocation(byteCount: 40, alignment: 1) { out in
            out[0] = UInt8(ascii: "w")
            let dash = ASCIIDigits.write(UInt64(max(slot, 0)), into: out, at: 1)
            out[dash] = UInt8(ascii: "-")
            let end = ASCIIDigits.write(number, radix: 16, into: out, at: dash + 1)
            return String(decoding: UnsafeRawBufferPointer(rebasing: out[..<end]), as: UTF8.self)
        }
    }

    /// Users whose `POST /sse/send` rate this worker tracks at once (see `RateTable`).
    static let sendRateUsers = 10_000

    /// A new session, of either transport.
    func register(_ session: SessionHandler) {
        guard session.registryIndex < 0 else { return }
        session.registryIndex = sessions.count
        sessions.append(session)
        if session.isEventStream {
            eventStreams[ObjectIdentifier(session)] = session
            startHeartbeats()
        }
        if stopping {
            // Accepted while draining a removed slot: send it straight on to another worker.
            session.sayGoodbye(stopReason, retryMs: Int.random(in: 500...3_000))
        }
    }

    /// Sweeps a WebSocket session for idleness; answers where its activity is to be logged.
    func watchIdle(_ session: SessionHandler) -> (log: ActivityLog, row: Int) {
        (idle.log, idle.add(session, now: .now()))
    }

    /// Event streams hear nothing from their clients, so they are not swept for idleness:
    /// a comment every `server.heartbeat_s` keeps proxies from cutting them, and a peer
    /// that is gone shows as a failed write or an outbound backlog (slow consumer).
    private func startHeartbeats() {
        guard heartbeats == nil else { return }
        heartbeats = eventLoop.assumeIsolated().scheduleTask(in: .seconds(Int64(settings.heartbeatSeconds))) { [self] in
            for session in eventStreams.values { session.heartbeat() }
            heartbeats = nil
            if !eventStreams.isEmpty { startHeartbeats() }
        }
    }

    /// Closes every connection of `user` with `bye kicked`.
    func kick(user: String) -> Int {
        let targets = sessions.filter { $0.user == user }
        for session in targets { session.sayGoodbye(.kicked, retryMs: Int.random(in: 30_000...60_000)) }
        if !targets.isEmpty { logger.info("kicked", metadata: ["user": "\(user)", "connections": "\(targets.count)"]) }
        return targets.count
    }

    var stats: ChildStats {
        var stats = ChildStats(connections: sessions.count, rooms: rooms.count, messagesIn: counters.messagesIn, messagesOut: counters.messagesOut)
        stats.eventStreamConnections = eventStreams.count
        stats.joins = counters.joins
        stats.busJoins = counters.busJoins
        stats.deliveries = counters.deliveries + rooms.deliveries
        stats.bytesOut = counters.bytesOut
        stats.slowConsumerDisconnects = counters.slowConsumerDisconnects
        stats.floodDisconnects = counters.floodDisconnects
        stats.busLatencyBuckets = counters.busLatencyBuckets
        stats.busLatencySumSeconds = counters.busLatencySumSeconds
        stats.gatheredDeliveries = rooms.gatheredDeliveries
        stats.gatheredWrites = rooms.gatheredWrites
        stats.gatheringRooms = rooms.gatheringRooms(limit: GatheringRoom.reportLimit)
        return stats
    }

    /// A session is gone; `idleRow` is the row `register` gave it.
    func unregister(_ session: SessionHandler, idleRow: Int?) {
        let index = session.registryIndex
        guard index >= 0, index < sessions.count, sessions[index] === session else { return }
        let last = sessions.removeLast()
        if index < sessions.count {
            sessions[index] = last
            last.registryIndex = index
        }
        session.registryIndex = -1
        eventStreams[ObjectIdentifier(session)] = nil
        if let idleRow { idle.remove(idleRow) }
        if stopping && sessions.isEmpty { onDrained?() }
    }

    // MARK: bus

    func bus(received message: RoomMessage) {
        rooms.deliver(message)
    }

    /// Called once, when the bus is first reachable (the worker reports ready then, so a
    /// reload never hands clients to a worker that would answer `unavailable`).
    var whenBusFirstConnected: (() -> Void)?

    /// (Re)joins every room that has local members, resuming where this worker left off,
    /// then lets the requests that waited for the bus go on once every re-join is answered:
    /// a send let go earlier could be sequenced before its room's re-join reads the bus's
    /// history (Redis subscribes first), and fall out of what that re-join replays.
    func busConnected() {
        if let first = whenBusFirstConnected {
            whenBusFirstConnected = nil
            first()
        }
        busLinks += 1
        let link = busLinks
        resyncsUnanswered = rooms.rooms.count
        for (name, room) in rooms.rooms {
            bus.join(room: name, since: room.lastSeq, epoch: room.epoch, history: 0, members: rooms.memberCount(name)) { [self] result in
                if case .success(let answer) = result {
                    rooms.resynced(name, result: answer)
                }
                guard link == busLinks else { return }
                resyncsUnanswered -= 1
                if resyncsUnanswered == 0 { releaseBusWaits() }
            }
        }
        if resyncsUnanswered == 0 { releaseBusWaits() }
    }

    /// Asks the bus to count one more member of `room` and answer with its state, at the
    /// end of this tick, together with the tick's other joins of the room from the same
    /// resume point (`MemberRequests`).
    func join(room: String, since: Int?, epoch: String?, history: Int, answer: @escaping MemberRequests.Answer) {
        gatherMemberRequest { $0.join(.init(room: room, since: since, epoch: epoch, history: history), answer: answer) }
    }

    /// Tells the bus, at the end of this tick, that `room` has one member fewer here.
    func leave(_ room: String) {
        gatherMemberRequest { $0.leave(room, members: 1) }
    }

    /// Adds a request to this tick's gathering; the first of a tick schedules the sending.
    private func gatherMemberRequest(_ add: (inout MemberRequests) -> Void) {
        let first = memberRequests.isEmpty
        add(&memberRequests)
        guard first else { return }
        eventLoop.assumeIsolated().execute { [self] in
            let gathered = memberRequests.take()
            // Joins first: a room left and joined again in one tick never shows the bus an
            // empty room, which would stop and restart its stream to this worker.
            for (key, answers) in gathered.joins {
                counters.busJoins += 1
                bus.join(room: key.room, since: key.since, epoch: key.epoch, history: key.history, members: answers.count) { result in
                    let shared = SharedJoinFrames()
                    for answer in answers { answer(result, shared) }
                }
            }
            for (room, members) in gathered.leaves {
                bus.leave(room: room, members: members)
            }
        }
    }

    private func releaseBusWaits() {
        // Lost again meanwhile: they wait for the next link.
        guard bus.isAvailable else { return }
        for proceed in waitingForBus.takeAll() { proceed(true) }
    }

    /// The deadline of a request that may wait for the bus (`bus.outage_wait_ms` from now).
    func busWaitDeadline() -> NIODeadline {
        .now() + .milliseconds(Int64(settings.config.bus.outageWaitMs))
    }

    /// The bus is reachable and every room is resynced after an outage: a join now goes
    /// to the bus at once.
    var isBusReady: Bool { bus.isAvailable && resyncsUnanswered == 0 }

    /// Runs `proceed(true)` once the bus is reachable (at once if it is), or
    /// `proceed(false)` when `deadline` passes first.
    func whenBusAvailable(until deadline: NIODeadline, _ proceed: @escaping (Bool) -> Void) {
        if isBusReady { return proceed(true) }
        guard deadline > .now() else { return proceed(false) }
        waitingForBus.add(proceed, until: deadline)
    }

    func busLost() {
        logger.warning("bus unavailable; joins and sends get `unavailable` until it is back", metadata: ["rooms": "\(rooms.count)"])
    }

    // MARK: history

    /// Scroll-back: the archive's page merged with the bus's newest messages (which the
    /// archiver may not have written yet), in time order, without duplicates.
    func history(room: String, before: HistoryPosition?, limit: Int,
                 completion: @escaping (Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void) {
        guard let archive else {
            guard bus.isAvailable else { return completion(.failure(.unavailable)) }
            return bus.fetch(room: room, before: before, limit: limit, completion: completion)
        }
        let fromArchive = eventLoop.makeFutureWithTask { try await archive.page(room: room, before: before, limit: limit) }
        let busAnswer: (Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void = { busPage in
            fromArchive.assumeIsolated().whenComplete { [self] archivePage in
                if case .failure(let error) = archivePage { archiveReadFailed(error) }
                let page = HistoryMerge.page(archived: try? archivePage.get(), recent: try? busPage.get(), limit: limit)
                completion(page.map { .success($0) } ?? .failure(.unavailable))
            }
        }
        if bus.isAvailable {
            bus.fetch(room: room, before: before, limit: limit, completion: busAnswer)
        } else {
            busAnswer(.failure(.unavailable))
        }
    }

    private func archiveReadFailed(_ error: any Error) {
        guard let heldBack = archiveReadWarnings.admit(now: monotonicSeconds()) else { return }
        logger.warning("archive read failed; scroll-back is answered from the bus's history alone", metadata: [
            "error": "\(error)", "failures_not_logged": "\(heldBack)",
        ])
    }

    // MARK: housekeeping

    /// How often `sweepIdle` runs (also how late a request waiting for the bus may learn
    /// that it waited long enough).
    static let idleSweepInterval = TimeAmount.milliseconds(250)

    /// One shared sweep over the idle table instead of a timer per connection. Pings
    /// connections that have been quiet for `idle_ping_s` (each up to a quarter of that, at
    /// most 10 s, early: a stable offset per connection) and closes those quiet for
    /// `idle_timeout_s`. Without the spread, viewers who joined in one burst and never
    /// write were all pinged in the same tick, 9,000 writes and then 9,000 pongs on one
    /// loop: a 200 ms stall for every member of the worker, every `idle_ping_s`.
    func sweepIdle() {
        for proceed in waitingForBus.takeExpired(now: .now()) { proceed(false) }
        let pingAfter = TimeAmount.seconds(Int64(settings.limits.idlePingSeconds))
        let due = idle.due(
            now: .now(), pingAfter: pingAfter,
            closeAfter: .seconds(Int64(settings.limits.idleTimeoutSeconds)),
            spread: .nanoseconds(min(pingAfter.nanoseconds / 4, TimeAmount.seconds(10).nanoseconds)))
        for session in due.close { session.close(code: CloseCode.goingAway) }
        for session in due.ping { session.ping() }
    }

    /// Says goodbye to every client, spread evenly over `window` so that their
    /// reconnects do not arrive as one stampede; calls `onDrained` when all are gone.
    func stop(reason: ByeReason, window: TimeAmount, on loop: any EventLoop) {
        stopping = true
        stopReason = reason
        logger.info("stopping", metadata: ["reason": "\(reason.rawValue)", "connections": "\(sessions.count)", "window_ms": "\(window.nanoseconds / 1_000_000)"])
        if sessions.isEmpty {
            onDrained?()
            return
        }
        let windowMs = max(0, Int(window.nanoseconds / 1_000_000))
        let everyone = Array(sessions)
        for (index, session) in everyone.enumerated() {
            // Reconnects spread over the window, so the new workers see no stampede.
            let retryMs = windowMs > 500 ? Int.random(in: 500...windowMs) : Int.random(in: 500...3_000)
            let delay = everyone.count > 1 ? windowMs * index / (everyone.count - 1) : 0
            if delay == 0 {
                session.sayGoodbye(reason, retryMs: retryMs)
            } else {
                loop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(delay))) { session.sayGoodbye(reason, retryMs: retryMs) }
            }
        }
    }
}
