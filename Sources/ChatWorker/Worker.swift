#if canImport(Glibc)
import Glibc
#endif
import ChatLink
import ChatProtocol
import ChatSystem
import Logging
import NIOCore
import NIOPosix

/// What a worker needs from the config, resolved once.
public struct WorkerSettings: Sendable {
    public var slot: Int
    public var generation: Int
    public var backlog: Int32
    public var heartbeatSeconds: Int
    public var heartbeatInterval: TimeAmount
    public var maxFrameBytes: Int
    public var maxTextBytes: Int
    public var conformanceEcho: Bool
    public var conformanceMaxMessageBytes: Int

    public init(slot: Int, generation: Int, backlog: Int32, heartbeatSeconds: Int, heartbeatInterval: TimeAmount,
                maxFrameBytes: Int, maxTextBytes: Int, conformanceEcho: Bool, conformanceMaxMessageBytes: Int) {
        self.slot = slot
        self.generation = generation
        self.backlog = backlog
        self.heartbeatSeconds = heartbeatSeconds
        self.heartbeatInterval = heartbeatInterval
        self.maxFrameBytes = maxFrameBytes
        self.maxTextBytes = maxTextBytes
        self.conformanceEcho = conformanceEcho
        self.conformanceMaxMessageBytes = conformanceMaxMessageBytes
    }
}

/// Figures the worker reports to the master.
struct WorkerCounters {
    var messagesIn = 0
    var messagesOut = 0
}

/// One worker process: accepts on the socket the master bound for its slot and holds
/// every connection and room table on one event loop, so nothing here needs a lock.
final class Worker {
    let settings: WorkerSettings
    let logger: Logger
    var counters = WorkerCounters()
    private var sessions: [ObjectIdentifier: SessionHandler] = [:]
    private var nextConnection: UInt64 = 0
    private var stopping = false
    var onDrained: (() -> Void)?

    init(settings: WorkerSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    var connectionCount: Int { sessions.count }

    func makeConnectionID() -> String {
        nextConnection += 1
        return "w\(settings.slot)-\(String(nextConnection, radix: 16))"
    }

    func register(_ session: SessionHandler) {
        sessions[ObjectIdentifier(session)] = session
    }

    func unregister(_ session: SessionHandler) {
        guard sessions.removeValue(forKey: ObjectIdentifier(session)) != nil else { return }
        if stopping && sessions.isEmpty { onDrained?() }
    }

    /// Says goodbye to every client, spread evenly over `window` so that their
    /// reconnects do not arrive as one stampede; calls `onDrained` when all are gone.
    func stop(reason: ByeReason, window: TimeAmount, on loop: any EventLoop) {
        stopping = true
        logger.info("stopping", metadata: ["reason": "\(reason.rawValue)", "connections": "\(sessions.count)", "window_ms": "\(window.nanoseconds / 1_000_000)"])
        if sessions.isEmpty {
            onDrained?()
            return
        }
        let windowMs = max(0, Int(window.nanoseconds / 1_000_000))
        let everyone = Array(sessions.values)
        for (index, session) in everyone.enumerated() {
            let retryMs = Int.random(in: 500...(1_500 + windowMs))
            let delay = everyone.count > 1 ? windowMs * index / (everyone.count - 1) : 0
            if delay == 0 {
                session.sayGoodbye(reason, retryMs: retryMs)
            } else {
                let bound = NIOLoopBound(session, eventLoop: loop)
                loop.scheduleTask(in: .milliseconds(Int64(delay))) { bound.value.sayGoodbye(reason, retryMs: retryMs) }
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
        let worker = try loop.submit {
            let worker = Worker(settings: settings, logger: logger)
            worker.onDrained = { runtime.finish() }
            return NIOLoopBound(worker, eventLoop: loop)
        }.wait()

        let server = try ServerBootstrap(group: runtime.group)
            .serverChannelOption(.backlog, value: settings.backlog)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                ConnectionPipeline.configure(channel, worker: worker)
            }
            .withBoundSocket(Descriptors.childListenFD)
            .wait()
        // NIO re-listens with a backlog of 128 whatever it was asked; restore ours.
        listen(Descriptors.childListenFD, settings.backlog)

        try runtime.connect(
            heartbeatInterval: settings.heartbeatInterval,
            stats: {
                let worker = worker.value
                return ChildStats(connections: worker.connectionCount, rooms: 0,
                                  messagesIn: worker.counters.messagesIn, messagesOut: worker.counters.messagesOut)
            },
            onStop: { reason, window in
                server.close(promise: nil)
                worker.value.stop(reason: reason == .reload ? .reload : .shutdown, window: window, on: loop)
            }
        )
        logger.info("serving", metadata: ["slot": "\(settings.slot)", "generation": "\(settings.generation)"])
        runtime.reportReady()
        runtime.runUntilFinished()
    }
}
