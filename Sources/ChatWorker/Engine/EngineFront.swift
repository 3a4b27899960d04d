#if canImport(Glibc)
import Glibc
#endif
import ChatAuth
import ChatConfig
import ChatEngine
import ChatLink
import ChatProtocol
import Logging
import NIOCore
import NIOPosix

/// The worker's side of its ChatEngine loop. Serves WebSocket upgrades at `/ws` (when
/// they can be decided at once: auth mode `none`, or a refusal NIO's path words) and
/// `/echo` itself: a session per connection, frames read by a `MessageReader` and written
/// straight to the socket. Every other request, and every upgrade it does not take, goes
/// with its descriptor and the bytes already read to SwiftNIO and the worker's usual
/// pipeline (`ConnectionPipeline`), where it is served as if NIO had accepted it.
final class EngineFront: LoopApplication {
    /// `Connection.kind` of the connections served here.
    static let chat: UInt8 = 1
    static let echo: UInt8 = 2
    /// `Connection.group`: where the WebSocket close handshake stands.
    static let open: Int32 = 0
    static let closeSent: Int32 = 1

    private let worker: Worker
    private let bound: NIOLoopBound<Worker>
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let overflow: OverflowRefusal
    private var resumeAccepting: Scheduled<Void>?
    private var acceptWarnings = AcceptFailureWarnings()
    private unowned(unsafe) var loop: Loop!
    /// By descriptor: the session of a chat connection, its reader, and a count of the
    /// connections the descriptor has held (a timer set for one must not close the next).
    private var sessions: ContiguousArray<SessionHandler?> = []
    private var readers: UnsafeMutablePointer<MessageReader>!
    private var generations: ContiguousArray<UInt32> = []
    private var activity: ActivityLog?
    private let chatRules: MessageRules
    private let echoRules: MessageRules?
    private let outboundLimit: Int
    /// Where a session's `hello` is written on its way out behind the 101 (the loop copies
    /// both into its answer buffer); a longer one takes a ByteBuffer.
    private let helloScratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)

    init(worker: NIOLoopBound<Worker>, listenFD: Int32, eventLoop: any EventLoop, logger: Logger) {
        self.bound = worker
        self.worker = worker.value
        self.eventLoop = eventLoop
        self.logger = logger
        overflow = OverflowRefusal(listenFD: listenFD)
        let config = worker.value.settings.config
        chatRules = MessageRules(maxMessageBytes: config.limits.maxFrameBytes, maxFragments: 1_000)
        // The conformance suite sends 16 MiB messages in 64-byte fragments.
        echoRules = config.conformance.echo ? MessageRules(maxMessageBytes: config.conformance.maxMessageBytes, maxFragments: 1 << 20) : nil
        outboundLimit = config.limits.outboundBufferBytes
    }

    /// The loop's configuration for this worker: a socket's queue may grow past the
    /// outbound limit (a session is judged a slow consumer after it writes, and says
    /// `bye`), but not without bound; in echo mode it holds an echoed message whole.
    static func loopConfig(_ gateway: GatewayConfig) -> LoopConfig {
        var config = LoopConfig()
        config.readOnAccept = true
        config.maxQueuedBytes = max(4 * gateway.limits.outboundBufferBytes,
                                    gateway.conformance.echo ? 2 * gateway.conformance.maxMessageBytes : 0)
        return config
    }

    func attach(to loop: Loop) {
        self.loop = loop
        loop.application = self
        sessions = ContiguousArray(repeating: nil, count: loop.capacity)
        generations = ContiguousArray(repeating: 0, count: loop.capacity)
        readers = .allocate(capacity: loop.capacity)
        readers.initialize(repeating: MessageReader(), count: loop.capacity)
    }

    // MARK: requests

    func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse) {
        let b = UnsafeRawBufferPointer(bytes)
        guard case .request(let request) = parse else { return handOff(fd, bytes: b) }
        let path = UnsafeRawBufferPointer(rebasing: b[request.path])
        if UpgradeParser.equals(path, "/ws") {
            openChat(fd, request, b)
        } else if echoRules != nil && UpgradeParser.equals(path, "/echo") {
            guard loop.upgrade(fd, request, in: b, subprotocol: Self.subprotocol(request, b)) else { return }
            opened(fd, kind: Self.echo)
        } else {
            handOff(fd, bytes: b)
        }
    }

    /// An upgrade at `/ws`, when it can be decided now; else NIO's path decides it.
    private func openChat(_ fd: Int32, _ request: UpgradeRequest, _ b: UnsafeRawBufferPointer) {
        let target = RequestTarget(String(decoding: b[request.path.lowerBound..<request.query.upperBound], as: UTF8.self))
        let origin = request.origin.isEmpty ? nil : String(decoding: b[request.origin], as: UTF8.self)
        let config = worker.settings.config
        switch Identity.authorizeAtOnce(origin: origin, target: target, origins: config.server.originList, verifier: worker.verifier) {
        case .success(let user)?:
            startSession(fd, user: user, request: request, in: b, opening: target.openingJoins)
        case .failure?:
            handOff(fd, bytes: b)
        case nil:
            let authorization = request.authorization.isEmpty ? nil : String(decoding: b[request.authorization], as: UTF8.self)
            guard let verifier = worker.verifier, let token = Identity.token(target: target, authorization: authorization) else {
                return handOff(fd, bytes: b)
            }
            verify(token, with: verifier, fd: fd, request: request, head: Array(b[..<request.headLength]), opening: target.openingJoins)
        }
    }

    /// Auth mode `jwt`: the request waits (what the client sends meanwhile kept unread)
    /// while the token is verified off the loop; then the 101, or NIO's path answers the
    /// refusal.
    private func verify(_ token: String, with verifier: TokenVerifier, fd: Int32, request: UpgradeRequest, head: [UInt8],
                        opening: [Result<ClientMessage, ProtocolError>]) {
        loop.decideLater(fd)
        let generation = generations[Int(fd)]
        let promise = eventLoop.makePromise(of: Result<AuthorizedUser, AuthRefusal>.self)
        promise.completeWithTask { await verifier.verify(token) }
        promise.futureResult.assumeIsolated().whenSuccess { [self] result in
            guard generations[Int(fd)] == generation, loop.conns[Int(fd)].state == Connection.deciding else { return }
            head.withUnsafeBytes { b in
                guard case .success(let user) = result else {
                    var bytes = ByteBuffer(bytes: b)
                    bytes.writeBytes(loop.keptInput(fd))
                    return bytes.withUnsafeReadableBytes { handOff(fd, bytes: $0) }
                }
                startSession(fd, user: user, request: request, in: b, opening: opening)
            }
            loop.resumeInput(fd)
            loop.endTurn()
        }
    }

    /// The 101 and the session's `hello` in one write (one segment, and one wake-up of
    /// the client, instead of two); then the joins of its URL (`opening`). While the bus is
    /// up, the 101 waits for those joins' answers (`HeldUpgrade`), so that hello, joined and
    /// the replay go out with it.
    private func startSession(_ fd: Int32, user: AuthorizedUser, request: UpgradeRequest, in b: UnsafeRawBufferPointer,
                              opening: [Result<ClientMessage, ProtocolError>]) {
        let session = SessionHandler(user: user, connectionID: worker.makeConnectionID(), transport: .engine(fd), worker: worker)
        let subprotocol = Self.subprotocol(request, b)
        guard !opening.isEmpty, worker.isBusReady else {
            let upgraded: Bool
            if let length = session.writeHelloFrame(into: helloScratch) {
                upgraded = loop.upgrade(fd, request, in: b, subprotocol: subprotocol, followedBy: UnsafeRawBufferPointer(rebasing: helloScratch[..<length]))
            } else {
                upgraded = session.helloFrame().withUnsafeReadableBytes { loop.upgrade(fd, request, in: b, subprotocol: subprotocol, followedBy: $0) }
            }
            guard upgraded else { return }
            start(session, fd)
            return session.handleOpening(opening)
        }
        loop.hold(fd, request, in: b, subprotocol: subprotocol)
        if let length = session.writeHelloFrame(into: helloScratch) {
            loop.write(fd, helloScratch.baseAddress!, length)
        } else {
            session.helloFrame().withUnsafeReadableBytes { loop.write(fd, $0.baseAddress!, $0.count) }
        }
        starting = fd
        defer { starting = -1 }
        start(session, fd)
        session.handleOpening(opening)
        guard loop.isHolding(fd) else { return }  // sent already (the session was closed meanwhile)
        guard session.awaitsJoins else { return release(fd) }
        held.append(HeldUpgrade(fd: fd, generation: generations[Int(fd)], until: .now() + Self.holdLimit))
        sweepHeldLater()
    }

    /// One timer for every held 101 rather than one per connection (each would re-arm the
    /// loop's timer): it lets go of those held past `holdLimit`, then waits for the next.
    /// Every hold is as long, so the oldest is first; those released meanwhile (most, in
    /// a storm of joins) are passed over, so the timer waits for one still held.
    private func sweepHeldLater() {
        let now = NIODeadline.now()
        while let upgrade = held.first {
            let stillHeld = generations[Int(upgrade.fd)] == upgrade.generation && loop.isHolding(upgrade.fd)
            if stillHeld && upgrade.until > now { break }
            held.removeFirst()
            if stillHeld { release(upgrade.fd) }
        }
        guard holdSweep == nil, let next = held.first?.until else { return }
        holdSweep = eventLoop.assumeIsolated().scheduleTask(deadline: next) { [self] in
            holdSweep = nil
            sweepHeldLater()
        }
    }

    private func start(_ session: SessionHandler, _ fd: Int32) {
        opened(fd, kind: Self.chat)
        sessions[Int(fd)] = session
        let watched = session.startOnEngine()
        activity = watched.log
        loop.conns[Int(fd)].index = Int32(watched.row)
    }

    /// A 101 that waits for the answers to the joins in the request's URL. Its head, and the
    /// frames the session writes meanwhile (hello, then what the answers bring), wait in the
    /// connection's queue (`Loop.hold`) and leave in one send when the last join is answered
    /// (`flush(_:awaitingJoins:)`). A bus that is slow to answer does not hold it past
    /// `holdLimit`; one that is down is not waited for at all. Here: when to let it go,
    /// for the connection of that `generation` on `fd` (a later one is not held by this).
    private struct HeldUpgrade {
        var fd: Int32
        var generation: UInt32
        var until: NIODeadline
    }

    private var held = CircularBuffer<HeldUpgrade>()
    private var holdSweep: Scheduled<Void>?
    /// The descriptor whose request is being answered right now (inside the loop's request
    /// call: its input is read on by the loop itself).
    private var starting: Int32 = -1
    static let holdLimit = TimeAmount.milliseconds(250)

    /// Sends a held 101 with the frames gathered behind it; the connection is open.
    private func release(_ fd: Int32) {
        guard loop.release(fd), fd != starting, !loop.keptInput(fd).isEmpty else { return }
        // Not from inside the session's call that let it go: what the client sent meanwhile
        // (usually nothing: it waits for the 101) is read on the loop's next turn.
        let generation = generations[Int(fd)]
        eventLoop.assumeIsolated().execute { [self] in
            guard generations[Int(fd)] == generation else { return }
            loop.resumeInput(fd)
            loop.endTurn()
        }
    }

    private func opened(_ fd: Int32, kind: UInt8) {
        loop.conns[Int(fd)].kind = kind
        loop.conns[Int(fd)].group = Self.open
        generations[Int(fd)] &+= 1
    }

    /// `chatgw.v1` when the client offered it (as NIO's path answers).
    private static func subprotocol(_ request: UpgradeRequest, _ b: UnsafeRawBufferPointer) -> StaticString? {
        guard !request.subprotocols.isEmpty else { return nil }
        return UpgradeParser.hasToken(b, request.subprotocols.lowerBound, request.subprotocols.upperBound, "chatgw.v1") ? "chatgw.v1" : nil
    }

    /// To NIO: the descriptor leaves the loop, and NIO's channel for it starts with the
    /// bytes the loop read.
    private func handOff(_ fd: Int32, bytes: UnsafeRawBufferPointer) {
        let read = ByteBuffer(bytes: bytes)
        loop.handOff(fd)
        let worker = bound
        ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in ConnectionPipeline.configure(channel, worker: worker) }
            .withConnectedSocket(fd)
            .whenComplete { [logger] result in
                switch result {
                case .success(let channel):
                    let pipeline = channel.pipeline.syncOperations
                    pipeline.fireChannelRead(NIOAny(read))
                    pipeline.fireChannelReadComplete()
                case .failure(let error):
                    // Not closed here: whether NIO took the descriptor before failing cannot
                    // be told, and closing one it took could close another connection's.
                    logger.warning("could not hand a connection to NIO", metadata: ["error": "\(error)"])
                }
            }
    }

    // MARK: frames in

    func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let kind = loop.conns[Int(fd)].kind
        var events = Events(front: self, fd: fd, kind: kind)
        var reader = readers[Int(fd)]
        let used = reader.read(p, count: count, rules: kind == Self.chat ? chatRules : echoRules!, handler: &events)
        readers[Int(fd)] = reader
        if kind == Self.chat, let session = sessions[Int(fd)] {
            activity?.heard(Int(loop.conns[Int(fd)].index), at: .now())
            session.flush()
        }
        return used
    }

    private struct Events: MessageHandler {
        let front: EngineFront
        let fd: Int32
        let kind: UInt8

        mutating func handle(_ event: MessageEvent) -> Bool {
            let loop = front.loop!
            switch event {
            case .text(let payload), .binary(let payload):
                let opcode: UInt8 = if case .text = event { Opcode.text } else { Opcode.binary }
                if kind == EngineFront.echo {
                    front.answer(fd, opcode: opcode, payload: payload)
                } else if let session = front.sessions[Int(fd)] {
                    let bytes = ByteBuffer(bytes: UnsafeRawBufferPointer(payload))
                    session.received(opcode == Opcode.text ? .text(bytes) : .binary(bytes))
                }
            case .ping(let payload):
                front.answer(fd, opcode: Opcode.pong, payload: payload)
            case .pong:
                break
            case .close(let code):
                // Our close went first: this is the answer. Else answer it with its code.
                if loop.conns[Int(fd)].group == EngineFront.closeSent { loop.doom(fd) } else { loop.closeWith(fd, code) }
                return false
            case .fail(let code):
                loop.closeWith(fd, code)
                return false
            }
            return loop.conns[Int(fd)].state == Connection.open
        }
    }

    /// A frame written where `payload` lies (the reader leaves room for its header).
    private func answer(_ fd: Int32, opcode: UInt8, payload: UnsafeMutableRawBufferPointer) {
        guard loop.conns[Int(fd)].group == Self.open else { return }
        let header = Frames.serverHeaderLength(payload.count)
        let start = payload.baseAddress! - header
        Frames.writeServerHeader(to: start, opcode: opcode, payloadLength: payload.count)
        loop.write(fd, start, header + payload.count)
    }

    func closed(_ loop: Loop, fd: Int32) {
        // Whatever waits for this connection (a token check, a close timer) is for it alone.
        generations[Int(fd)] &+= 1
        readers[Int(fd)].release()
        guard let session = sessions[Int(fd)] else { return }
        sessions[Int(fd)] = nil
        session.departed()
    }

    // MARK: for sessions

    /// A session's write: the first of a tick goes straight to the socket, later ones wait
    /// in the connection's queue for the session's flush, so that a member that gets k
    /// frames in one tick (a quiet room's burst, a reply and what follows it) costs two
    /// `send`s, not k: a room's first messages after a quiet spell come in bursts, and one
    /// `send` per frame per member then fell behind for seconds (the hot room at 20 msg/s).
    func write(_ bytes: ByteBuffer, to fd: Int32) {
        bytes.withUnsafeReadableBytes { loop.writeOncePerFlush(fd, $0.baseAddress!, $0.count) }
    }

    /// The session's flush (once per tick at most for a room's members): what its writes
    /// queued goes out in one `send`. A held 101 goes out, with everything behind it, once
    /// none of the session's joins waits for the bus any more.
    func flush(_ fd: Int32, awaitingJoins: @autoclosure () -> Bool) {
        loop.flush(fd)
        guard loop.isHolding(fd), fd != starting, !awaitingJoins() else { return }
        release(fd)
    }

    /// More is waiting for the socket than the outbound limit: a slow consumer. Not while
    /// its 101 is held: nothing was sent yet (a long replay gathers behind it).
    func isBehind(_ fd: Int32) -> Bool {
        loop.queuedBytes(fd) > outboundLimit && !loop.isHolding(fd)
    }

    func idleRow(_ fd: Int32) -> Int? {
        loop.conns[Int(fd)].kind == Self.chat ? Int(loop.conns[Int(fd)].index) : nil
    }

    func ping(_ fd: Int32) {
        var frame: (UInt8, UInt8) = (0x80 | Opcode.ping, 0)
        withUnsafeBytes(of: &frame) { loop.write(fd, $0.baseAddress!, 2) }
        loop.flush(fd)
    }

    /// Starts the close handshake (after `bye`, if given): the connection closes when the
    /// client answers, or after `WebSocketHandler.closeHandshakeTimeout`.
    func close(_ fd: Int32, code: UInt16, after bye: ByteBuffer?) {
        release(fd)
        guard loop.conns[Int(fd)].state == Connection.open, loop.conns[Int(fd)].group == Self.open else { return }
        if let bye { write(bye, to: fd) }
        loop.sendClose(fd, code)
        loop.flush(fd)
        loop.conns[Int(fd)].group = Self.closeSent
        let generation = generations[Int(fd)]
        eventLoop.assumeIsolated().scheduleTask(in: WebSocketHandler.closeHandshakeTimeout) { [self] in
            guard generations[Int(fd)] == generation else { return }
            loop.doom(fd)
            loop.endTurn()
        }
    }

    // MARK: out of files

    /// Out of files: answer the waiting connections 503 from the reserve descriptor
    /// (`OverflowRefusal`), or, without one, stop accepting for a moment (a level-triggered
    /// listener with a connection waiting would otherwise wake the loop forever).
    func acceptFailed(_ loop: Loop, listener: Int32, errno error: Int32) {
        if error == EMFILE, let taken = overflow.refuseWaiting() {
            AcceptPause.count(fileLimitRefusals: taken)
            acceptWarnings.record(relieved: taken)
            return acceptWarnings.warnIfDue(errno: error, logger: logger)
        }
        acceptWarnings.record(relieved: nil)
        acceptWarnings.warnIfDue(errno: error, logger: logger)
        guard resumeAccepting == nil else { return }
        loop.pauseAccepting()
        resumeAccepting = eventLoop.assumeIsolated().scheduleTask(in: AcceptPause.interval) { [self] in
            resumeAccepting = nil
            loop.resumeAccepting()
        }
    }
}
