#if canImport(Glibc)
import Glibc
#endif
import ChatArchive
import ChatAuth
import ChatBus
import CChatEngine
import ChatConfig
import ChatEngine
import ChatLink
import ChatSystem
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

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

    /// The descriptor table a worker grows at start (up to its file limit): beyond it the
    /// table doubles as connections come, each time with a short stall.
    static let reservedDescriptors: Int32 = 65536

    private static func start(settings: WorkerSettings, logger: Logger) throws -> Never {
        // First, before any connection: at most one grace period now instead of one per
        // doubling in the first storm (chatengine_reserve_descriptors).
        let reserved = chatengine_reserve_descriptors(reservedDescriptors)
        if reserved != 0 { logger.debug("descriptor table not grown at start", metadata: ["errno": "\(reserved)"]) }
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

        let listener = try Listener.start(config, worker: worker, loop: loop, logger: logger)

        loop.scheduleRepeatedTask(initialDelay: Worker.idleSweepInterval, delay: Worker.idleSweepInterval) { _ in worker.value.sweepIdle() }
        try runtime.connect(
            heartbeatInterval: .milliseconds(Int64(config.supervisor.heartbeatIntervalMs)),
            commands: ChildCommands(
                stats: { worker.value.stats },
                stop: { reason, window, keepAccepting in
                    let worker = worker.value
                    if keepAccepting {
                        // Our socket closes with us: keep taking what is queued on it until the end.
                        worker.onDrained = { listener.close().whenComplete { _ in runtime.finish() } }
                    } else {
                        _ = listener.close()
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

/// Where a worker accepts its clients: NIO's server channel, or the worker's own epoll
/// loop turned on the same event loop (`server.engine`).
enum Listener {
    case nio(any Channel)
    case engine(NIOLoopBound<EngineHost>)

    static func start(_ config: GatewayConfig, worker: NIOLoopBound<Worker>, loop: any EventLoop, logger: Logger) throws -> Listener {
        let fd = Descriptors.childListenFD
        switch config.server.engine {
        case .nio:
            // No per-connection TCP_NODELAY option: ServerBootstrap sets it on the listener and
            // accepted sockets inherit it (test_conformance checks), saving a setsockopt each.
            let server = try ServerBootstrap(group: loop)
                .serverChannelOption(.backlog, value: Int32(config.server.backlog))
                .serverChannelInitializer { channel in
                    let overflow = OverflowRefusal(listenFD: fd)
                    return AcceptPause.install(on: channel, logger: logger, relieve: overflow.refuseWaiting)
                }
                .childChannelInitializer { channel in
                    ConnectionPipeline.configure(channel, worker: worker)
                }
                .withBoundSocket(fd)
                .wait()
            // NIO re-listens with a backlog of 128 whatever it was asked; restore ours.
            listen(fd, Int32(config.server.backlog))
            return .nio(server)
        case .epoll:
            // With TCP_DEFER_ACCEPT a connection is accepted once its request is there, and
            // the loop reads it right away: no turn that only registers it.
            var deferSeconds: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_DEFER_ACCEPT, &deferSeconds, 4)
            // Accepted sockets inherit it, as they do from NIO's listener: no setsockopt per
            // connection. (Before, nothing set it on the listener in this mode, and an accepted
            // socket was once found without it.)
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            listen(fd, Int32(config.server.backlog))
            let host = try loop.submit {
                let engine = Loop(config: EngineFront.loopConfig(config))
                let front = EngineFront(worker: worker, listenFD: fd, eventLoop: loop, logger: logger)
                front.attach(to: engine)
                worker.value.engine = front
                let host = EngineHost(loop: engine, application: front, eventLoop: loop)
                engine.addListener(fd)
                let bound = NIOLoopBound(host, eventLoop: loop)
                let wanted = config.server.engineWakeup
                return host.start(allowRing: wanted == .ioUring).map { watch in
                    if wanted == .ioUring && watch != .ring {
                        logger.warning("io_uring is not available here; the epoll loop wakes this worker through a helper thread (server.engine_wakeup: thread)")
                    }
                    logger.debug("epoll loop wake-up: \(watch.rawValue)")
                    return bound
                }
            }.flatMap { $0 }.wait()
            return .engine(host)
        }
    }

    /// Stops accepting and closes the listening socket.
    func close() -> EventLoopFuture<Void> {
        switch self {
        case .nio(let channel):
            return channel.close()
        case .engine(let bound):
            let host = bound.value
            host.loop.removeListener(Descriptors.childListenFD)
            Glibc.close(Descriptors.childListenFD)
            return host.eventLoop.makeSucceededVoidFuture()
        }
    }
}
