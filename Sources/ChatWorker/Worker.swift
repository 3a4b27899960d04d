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

/// What a worker is: its slot and generation, and the config the master resolved.
public struct WorkerSettings: Sendable {
    public var slot: Int
    public var generation: Int
    public var config: GatewayConfig

    public init(slot: Int, generation: Int, config: GatewayConfig) {
        self.slot = slot
        self.generation = generation
        self.config = config
    }

    var limits: GatewayConfig.Limits { config.limits }
    var heartbeatSeconds: Int { config.server.heartbeatSeconds }
}

/// Figures the worker reports to the master (cumulative).
struct WorkerCounters {
    var messagesIn = 0
    var messagesOut = 0
    var joins = 0
    /// Replayed messages written; live ones are counted by the room table.
    var deliveries = 0
    var bytesOut = 0
    var slowConsumerDisconnects = 0
    var floodDisconnects = 0
    var busLatencyBuckets = [Int](repeating: 0, count: BusLatency.bucketBounds.count + 1)
    var busLatencySumSeconds = 0.0

    mutating func observeBusLatency(seconds: Double) {
        busLatencyBuckets[BusLatency.bucket(for: seconds)] += 1
        busLatencySumSeconds += seconds
    }
}

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
    var counters = WorkerCounters()
    private var sessions: [ObjectIdentifier: SessionHandler] = [:]
    private let idle = IdleTable<SessionHandler>()
    private var nextConnection: UInt64 = 0
    /// Joins and sends that came while the bus was unreachable, waiting for it to come
    /// back (until their deadline): a relay or Redis restart takes a fraction of a second,
    /// and a client told `unavailable` for it has to have been written to retry.
    private var waitingForBus: [(deadline: NIODeadline, proceed: (Bool) -> Void)] = []
    /// Re-joins after the bus came back that are not answered yet; requests wait for them.
    private var resyncsUnanswered = 0
    /// Counts bus links, so that a re-join answered after its link was replaced is not counted.
    private var busLinks = 0
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
        self.rooms = LocalRooms(eventLoop: eventLoop)
        bus.delegate = self
    }

    var connectionCount: Int { sessions.count }

    func makeConnectionID() -> String {
        nextConnection += 1
        return "w\(settings.slot)-\(String(nextConnection, radix: 16))"
    }

    func register(_ session: SessionHandler) {
        sessions[ObjectIdentifier(session)] = session
        session.webSocket.idle = (idle, idle.add(session, now: .now()))
        if stopping {
            // Accepted while draining a removed slot: send it straight on to another worker.
            session.sayGoodbye(stopReason, retryMs: Int.random(in: 500...3_000))
        }
    }

    /// Closes every connection of `user` with `bye kicked`.
    func kick(user: String) -> Int {
        let targets = sessions.values.filter { $0.user == user }
        for session in targets { session.sayGoodbye(.kicked, retryMs: Int.random(in: 30_000...60_000)) }
        if !targets.isEmpty { logger.info("kicked", metadata: ["user": "\(user)", "connections": "\(targets.count)"]) }
        return targets.count
    }

    var stats: ChildStats {
        var stats = ChildStats(connections: sessions.count, rooms: rooms.count, messagesIn: counters.messagesIn, messagesOut: counters.messagesOut)
        stats.joins = counters.joins
        stats.deliveries = counters.deliveries + rooms.deliveries
        stats.bytesOut = counters.bytesOut
        stats.slowConsumerDisconnects = counters.slowConsumerDisconnects
        stats.floodDisconnects = counters.floodDisconnects
        stats.busLatencyBuckets = counters.busLatencyBuckets
        stats.busLatencySumSeconds = counters.busLatencySumSeconds
        return stats
    }

    func unregister(_ session: SessionHandler) {
        guard sessions.removeValue(forKey: ObjectIdentifier(session)) != nil else { return }
        if let row = session.webSocket.idle?.row { idle.remove(row) }
        session.webSocket.idle = nil
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

    private func releaseBusWaits() {
        // Lost again meanwhile: they wait for the next link.
        guard bus.isAvailable else { return }
        let waiting = waitingForBus
        waitingForBus.removeAll()
        for request in waiting { request.proceed(true) }
    }

    /// The deadline of a request that may wait for the bus (`bus.outage_wait_ms` from now).
    func busWaitDeadline() -> NIODeadline {
        .now() + .milliseconds(Int64(settings.config.bus.outageWaitMs))
    }

    /// Runs `proceed(true)` once the bus is reachable (at once if it is), or
    /// `proceed(false)` when `deadline` passes first.
    func whenBusAvailable(until deadline: NIODeadline, _ proceed: @escaping (Bool) -> Void) {
        if bus.isAvailable && resyncsUnanswered == 0 { return proceed(true) }
        guard deadline > .now() else { return proceed(false) }
        waitingForBus.append((deadline, proceed))
    }

    private func expireBusWaits(now: NIODeadline) {
        guard waitingForBus.contains(where: { $0.deadline <= now }) else { return }
        let expired = waitingForBus.filter { $0.deadline <= now }
        waitingForBus.removeAll { $0.deadline <= now }
        for request in expired { request.proceed(false) }
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
            fromArchive.assumeIsolated().whenComplete { archivePage in
                let archived = try? archivePage.get()
                let recent = try? busPage.get()
                guard archived != nil || recent != nil else { return completion(.failure(.unavailable)) }
                var seen = Set<String>()
                let merged = ((archived?.messages ?? []) + (recent?.messages ?? []))
                    .filter { seen.insert("\($0.epoch):\($0.seq)").inserted }
                    .sorted { ($0.ts, $0.epoch, $0.seq) < ($1.ts, $1.epoch, $1.seq) }
                let page = Array(merged.suffix(limit))
                completion(.success((page, merged.count > limit || archived?.more == true || recent?.more == true)))
            }
        }
        if bus.isAvailable {
            bus.fetch(room: room, before: before, limit: limit, completion: busAnswer)
        } else {
            busAnswer(.failure(.unavailable))
        }
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
        expireBusWaits(now: .now())
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
        let everyone = Array(sessions.values)
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

/// Starts a worker process and never returns.
public enum WorkerProcess {
    public static func run(settings: WorkerSettings, logger: Logger) -> Never {
        if let crashSlot = ProcessEnvironment.current()["CHATGW_TEST_CRASH_SLOT"], crashSlot == "\(settings.slot)" {
            logger.critical("crashing on purpose (CHATGW_TEST_CRASH_SLOT)")
            exit(70)
        }
        do {
            try start(settings: settings, logger: logger)
        } catch {
            logger.critical("worker failed to start", metadata: ["error": "\(error)"])
            exit(1)
        }
    }

    private static func start(settings: WorkerSettings, logger: Logger) throws -> Never {
        let runtime = ChildRuntime(logger: logger)
        let loop = runtime.eventLoop
        let config = settings.config
        let secret = config.auth.jwtSecret
        let verifier: TokenVerifier? = config.auth.mode == .jwt ? runBlocking { try? await TokenVerifier(secret: secret) } : nil
        if config.auth.mode == .jwt && verifier == nil {
            // The config was validated (a secret of at least 32 bytes); never fall back to no auth.
            logger.critical("cannot set up JWT verification; refusing to serve without it")
            exit(1)
        }
        let archive: (any ArchiveStore)?
        do {
            archive = try Archive.open(config, readOnly: true)
        } catch {
            logger.warning("archive not readable; scroll-back uses the bus history only", metadata: ["error": "\(error)"])
            archive = nil
        }
        let worker = try loop.submit {
            let bus = BusFactory.make(config: config, processName: "w\(settings.slot)", eventLoop: loop, logger: logger)
            let worker = Worker(settings: settings, bus: bus, verifier: verifier, archive: archive, eventLoop: loop, logger: logger)
            worker.onDrained = { runtime.finish() }
            bus.start()
            return NIOLoopBound(worker, eventLoop: loop)
        }.wait()

        // No per-connection TCP_NODELAY option: ServerBootstrap sets it on the listener and
        // accepted sockets inherit it (test_conformance checks), saving a setsockopt each.
        let server = try ServerBootstrap(group: runtime.group)
            .serverChannelOption(.backlog, value: Int32(config.server.backlog))
            .serverChannelInitializer { channel in
                let overflow = OverflowRefusal(listenFD: Descriptors.childListenFD)
                return AcceptPause.install(on: channel, logger: logger, relieve: overflow.refuseWaiting)
            }
            .childChannelInitializer { channel in
                ConnectionPipeline.configure(channel, worker: worker)
            }
            .withBoundSocket(Descriptors.childListenFD)
            .wait()
        // NIO re-listens with a backlog of 128 whatever it was asked; restore ours.
        listen(Descriptors.childListenFD, Int32(config.server.backlog))

        loop.scheduleRepeatedTask(initialDelay: Worker.idleSweepInterval, delay: Worker.idleSweepInterval) { _ in worker.value.sweepIdle() }
        try runtime.connect(
            heartbeatInterval: .milliseconds(Int64(config.supervisor.heartbeatIntervalMs)),
            commands: ChildCommands(
                stats: { worker.value.stats },
                stop: { reason, window, keepAccepting in
                    let worker = worker.value
                    if keepAccepting {
                        // Our socket closes with us: keep taking what is queued on it until the end.
                        worker.onDrained = { server.close().whenComplete { _ in runtime.finish() } }
                    } else {
                        server.close(promise: nil)
                    }
                    worker.stop(reason: reason == .reload ? .reload : .shutdown, window: window, on: loop)
                },
                kick: { user in _ = worker.value.kick(user: user) }
            )
        )
        // Ready once the bus answers, or after a few seconds without it (the worker still
        // serves; joins get `unavailable` until the bus is back).
        let ready = NIOLockedValueBox(false)
        let reportReady: @Sendable () -> Void = {
            guard !ready.withLockedValue({ let was = $0; $0 = true; return was }) else { return }
            logger.info("serving", metadata: ["slot": "\(settings.slot)", "generation": "\(settings.generation)"])
            runtime.reportReady()
        }
        loop.execute {
            if worker.value.bus.isAvailable { reportReady() } else { worker.value.whenBusFirstConnected = reportReady }
        }
        loop.scheduleTask(in: .seconds(3)) { reportReady() }
        runtime.runUntilFinished()
    }
}
