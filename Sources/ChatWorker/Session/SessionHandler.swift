import ChatAuth
import ChatArchive
import ChatBus
import ChatProtocol
import ChatSystem
import NIOCore
import NIOWebSocket

/// How a session's messages reach its client, and how the connection is closed.
enum SessionTransport {
    /// Pre-framed WebSocket frames; closes, pings and activity through the WebSocket layer.
    case webSocket(WebSocketHandler)
    /// Server-Sent Events (docs/PROTOCOL.md "SSE"): nothing comes in after the request;
    /// the worker's heartbeat comments stand in for pings.
    case eventStream
    /// A WebSocket on the worker's epoll loop (`server.engine: epoll`), by descriptor:
    /// frames go straight to the socket, and the loop runs the WebSocket duties.
    case engine(Int32)
}

/// One client's conversation: turns requests into actions on the worker's rooms and
/// the bus, and writes the answers, over either transport. Lives on the worker's single
/// event loop, like everything it touches.
final class SessionHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketMessage
    typealias OutboundOut = ByteBuffer

    let user: String
    let permission: RoomPermission
    let connectionID: String
    let transport: SessionTransport
    private let worker: Worker
    /// Set while this session waits in the room table's list of members to flush.
    var flushQueued = false
    /// Its place in the worker's list of sessions while registered, else -1.
    var registryIndex = -1
    private var context: ChannelHandlerContext?
    /// Where this session's frames enter the pipeline: the context next to the head (the
    /// frame decoder's; everything between it and here is inbound-only), so a write or a
    /// flush does not walk every stage in between, once per member per message.
    private var output: ChannelHandlerContext?
    private var rooms = SessionRooms()
    private var bucket: TokenBucket
    private var flood: FloodDetector
    private var closing = false
    /// Between the start (in a pipeline, or on the engine) and the connection's end.
    private var isOpen = false
    private static let allocator = ByteBufferAllocator()
    /// Event streams only: where the client stands in each room, sent as each event's id.
    private var position = StreamPosition()

    init(user: AuthorizedUser, connectionID: String, transport: SessionTransport, worker: Worker) {
        self.transport = transport
        self.user = user.name
        self.permission = user.rooms
        self.connectionID = connectionID
        self.worker = worker
        let limits = worker.settings.limits
        bucket = TokenBucket(rate: limits.ratePerSecond, burst: limits.burst)
        flood = FloodDetector(limit: limits.floodViolations)
    }

    var isEventStream: Bool {
        if case .eventStream = transport { return true }
        return false
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        isOpen = true
        switch transport {
        case .webSocket(let webSocket):
            output = (try? context.pipeline.syncOperations.context(handlerType: ByteToMessageHandler<WebSocketFrameDecoder>.self)) ?? context
            // A strong capture: the WebSocket handler drops the closure when it is removed from
            // the pipeline, which ends the cycle (a weak one cost a side table per connection).
            webSocket.onClosing = { [self] in
                // A close frame went out or came in: write nothing more, leave the rooms.
                guard !closing else { return }
                closing = true
                departedRooms()
            }
            worker.register(self)
            webSocket.activity = worker.watchIdle(self)
        case .eventStream:
            output = (try? context.pipeline.syncOperations.context(handlerType: EventStreamInput.self)) ?? context
            worker.register(self)
        case .engine:
            preconditionFailure("an engine session is started with startOnEngine()")
        }
        sayHello()
        handleOpening(openingJoins)
        openingJoins = []
    }

    /// The `hello` frame of a session on the engine, which writes it with the 101.
    func helloFrame() -> ByteBuffer {
        let frame = FrameBytes.text(hello, allocator: Self.allocator)
        countOut(frames: 1, bytes: frame.readableBytes)
        return frame
    }

    /// `helloFrame()` written at the start of `out` instead; its length, or nil (nothing
    /// written or counted) if `out` is too short.
    func writeHelloFrame(into out: UnsafeMutableRawBufferPointer) -> Int? {
        let text = HelloText(user: user, conn: connectionID, heartbeatSeconds: worker.settings.heartbeatSeconds)
        guard let length = FrameBytes.writeHello(text, into: out) else { return nil }
        countOut(frames: 1, bytes: length)
        return length
    }

    /// The start of a session on the engine, right after its 101 and `hello`; answers where
    /// its activity is to be logged.
    func startOnEngine() -> (log: ActivityLog, row: Int) {
        isOpen = true
        worker.register(self)
        return worker.watchIdle(self)
    }

    private var hello: ServerMessage {
        .hello(user: user, conn: connectionID, heartbeatSeconds: worker.settings.heartbeatSeconds)
    }

    private func sayHello() {
        send(hello)
        flush()
    }

    /// The requests an event stream's own request carried (its rooms, its resume points),
    /// handled as if they had come after `hello`. The stream's id starts at the resume
    /// points, so it keeps asking for a replay until the replay has come.
    func open(with requests: [Result<ClientMessage, ProtocolError>]) {
        guard !closing else { return }
        position = StreamPosition(resuming: requests)
        handleOpening(requests)
    }

    /// The joins of a WebSocket client's URL (`RequestTarget.openingJoins`), handled as if
    /// they had come right after `hello`.
    var openingJoins: [Result<ClientMessage, ProtocolError>] = []

    /// Requests the connection's own request carried, handled as if they had come after
    /// `hello`; a refused one is answered with its error.
    func handleOpening(_ requests: [Result<ClientMessage, ProtocolError>]) {
        guard !requests.isEmpty, !closing else { return }
        for request in requests {
            switch request {
            case .success(let request): handle(request)
            case .failure(let error): send(.error(error))
            }
        }
        flush()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        departed()
        self.context = nil
        output = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        departed()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        received(unwrapInboundIn(data))
    }

    /// A whole message from the client.
    func received(_ message: WebSocketMessage) {
        guard !closing else { return }
        worker.counters.messagesIn += 1
        switch message {
        case .binary:
            send(.error(ProtocolError(.badFrame, "frames must be text holding one JSON object")))
        case .text(let text):
            switch ClientMessage.decode(text, maxTextBytes: worker.settings.limits.maxTextBytes) {
            case .success(let request):
                if case .ping = request {} else if !admit(request) { return }
                handle(request)
            case .failure(let error):
                send(.error(error))
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flush()
    }

    /// Over the outbound buffer while a busy room's events were queued to an event stream
    /// member (WebSocket members get a window in one write): give the kernel what it takes
    /// now, so gathering never lets a member's backlog grow past the limit.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if !context.channel.isWritable { flush() }
        context.fireChannelWritabilityChanged()
    }

    /// Still over the outbound buffer after a flush gave the kernel all it would take:
    /// this reader is too slow for its rooms. Cut it off rather than let its backlog grow
    /// or hold anyone else back. (Judged after the flush, not on every write, so a burst
    /// queued within one loop tick does not count against a client that reads.)
    private func checkBacklog() {
        guard !closing else { return }
        switch transport {
        case .engine(let fd):
            guard worker.engine!.isBehind(fd) else { return }
        case .webSocket, .eventStream:
            guard let context, !context.channel.isWritable else { return }
        }
        worker.counters.slowConsumerDisconnects += 1
        sayGoodbye(.slowConsumer, retryMs: Int.random(in: 1_000...5_000))
    }

    // MARK: requests

    /// Rate limiting: every request but ping takes a token; a connection that keeps
    /// hitting the limit is flooding and is closed.
    private func admit(_ request: ClientMessage) -> Bool {
        let now = monotonicSeconds()
        if bucket.take(now: now) { return true }
        if flood.recordViolation(now: now) {
            worker.counters.floodDisconnects += 1
            sayGoodbye(.flood, retryMs: Int.random(in: 5_000...15_000))
        } else {
            send(.error(ProtocolError(.rateLimited, "slow down: at most \(worker.settings.limits.ratePerSecond) requests per second", ref: request.ref)))
        }
        return false
    }

    private func handle(_ request: ClientMessage) {
        switch request {
        case .join(let room, let since, let epoch, let history, let ref):
            join(room, since: since, epoch: epoch, history: history, ref: ref)
        case .leave(let room, let ref):
            leave(room, ref: ref)
        case .send(let room, let text, let ref):
            publish(room, text: text, ref: ref)
        case .history(let room, let before, let limit, let ref):
            history(room, before: before, limit: limit, ref: ref)
        case .ping(let ref):
            send(.pong(ref: ref))
        }
    }

    private func join(_ requested: String, since: Int?, epoch: String?, history: Int, ref: String?) {
        let room = worker.rooms.sharedName(requested)
        let limit = worker.settings.limits.roomsPerConnection
        switch rooms.join(room, allowed: permission.allows(room), roomLimit: limit) {
        case .joinedAlready:
            guard let local = worker.rooms.room(room) else { return }
            send(.joined(room: room, seq: local.lastSeq, epoch: local.epoch, members: local.knownMembers, ref: ref))
        case .refuse(let code, let message):
            send(.error(ProtocolError(code, message, ref: ref, room: room)))
        case .askBus(let attempt):
            worker.counters.joins += 1
            let request = JoinRequest(room: room, since: since, epoch: epoch, history: history, ref: ref,
                                      attempt: attempt, deadline: worker.busWaitDeadline())
            requestJoin(request)
        }
    }

    /// A join on its way to the bus.
    private struct JoinRequest {
        var room: String
        var since: Int?
        var epoch: String?
        var history: Int
        var ref: String?
        var attempt: UInt32
        /// Until when it may wait for an unreachable bus.
        var deadline: NIODeadline
    }

    /// Asks the bus to join, once it is reachable.
    private func requestJoin(_ request: JoinRequest) {
        let room = request.room
        worker.whenBusAvailable(until: request.deadline) { [self] available in
            switch rooms.busWaitEnded(room, attempt: request.attempt, available: available) {
            case .drop:
                return
            case .unavailable:
                sendUnavailable(ref: request.ref, room: room)
                return flush()
            case .askBus:
                break
            }
            worker.join(room: room, since: request.since, epoch: request.epoch, history: request.history) { [self] result, shared in
                answered(request, result, sharing: shared)
            }
        }
    }

    private func answered(_ request: JoinRequest, _ result: Result<JoinResult, BusError>, sharing shared: SharedJoinFrames) {
        let room = request.room
        let answer = try? result.get()
        let reads = answer.flatMap { JoinReply.reads(for: $0, since: request.since, epoch: request.epoch) }
        let needsArchive = reads != nil && worker.archive != nil
        switch rooms.busAnswered(room, attempt: request.attempt, succeeded: answer != nil, needsArchive: needsArchive,
                                 mayWaitMore: request.deadline > .now()) {
        case .undo:
            worker.leave(room)
        case .drop:
            break
        case .askAgain:
            requestJoin(request)
        case .unavailable:
            sendUnavailable(ref: request.ref, room: room)
            flush()
        case .joined:
            worker.rooms.add(self, to: room, snapshot: answer!.room)
            writeJoin(JoinReply(room: room, answer: answer!, ref: request.ref), sharing: shared)
            flush()
        case .fill:
            worker.rooms.add(self, to: room, snapshot: answer!.room, filling: true)
            fill(JoinReply(room: room, answer: answer!, ref: request.ref), attempt: request.attempt, reading: reads!, from: worker.archive!)
        }
    }

    /// The history no longer reaches back to `since`: the reply waits for the archive.
    /// Meanwhile the room table keeps this member's live messages back; they are written
    /// after the reply.
    private func fill(_ reply: JoinReply, attempt: UInt32, reading reads: JoinReply.ArchiveReads, from archive: any ArchiveStore) {
        let room = reply.room
        let batchWait = Duration.milliseconds(worker.settings.config.archive.batchMilliseconds + 50)
        worker.eventLoop.makeFutureWithTask { try await archive.read(reads, room: room, batchWait: batchWait) }
            .assumeIsolated()
            .whenComplete { [self] result in
                // Left or disconnected meanwhile: the room table and the bus were told then.
                guard rooms.filled(room, attempt: attempt) else { return }
                let read = (try? result.get()) ?? (olderEpochTail: [], lost: [])
                sendJoin(reply.messages(olderEpochTail: read.olderEpochTail, archived: read.lost))
                let live = worker.rooms.finishFilling(self, in: room)
                for frame in live { write(frame) }
                worker.counters.deliveries += live.count
                flush()
            }
    }

    /// A join's reply as the frames its group's first WebSocket member encoded; an event
    /// stream's events carry this stream's own ids.
    private func writeJoin(_ reply: JoinReply, sharing shared: SharedJoinFrames) {
        if case .eventStream = transport { return sendJoin(reply.messages()) }
        write(shared.joined(reply, allocator: Self.allocator))
        let following = shared.following(reply, allocator: Self.allocator)
        guard following.frames > 0 else { return }
        worker.counters.deliveries += following.messages
        write(following.bytes, frames: following.frames)
    }

    private func sendJoin(_ reply: [ServerMessage]) {
        for message in reply {
            if case .message = message { worker.counters.deliveries += 1 }
            send(message)
        }
    }

    private func leave(_ room: String, ref: String?) {
        switch rooms.leave(room) {
        case .notJoined:
            send(.error(ProtocolError(.notJoined, "not a member of this room", ref: ref, room: room)))
        case .left(let quit):
            if quit { self.quit(room) }
            send(.left(room: room, ref: ref))
        }
    }

    private func publish(_ room: String, text: String, ref: String?) {
        guard rooms.canSend(to: room) else {
            return send(.error(ProtocolError(.notJoined, "join the room before sending to it", ref: ref, room: room)))
        }
        // Waits for an unreachable bus like a join, but is never asked twice: a send whose
        // link dropped before the answer may have been sequenced, so it is `unavailable`.
        worker.whenBusAvailable(until: worker.busWaitDeadline()) { [self] available in
            guard isOpen else { return }
            guard rooms.canSend(to: room) else {
                send(.error(ProtocolError(.notJoined, "left the room before the message could be sent", ref: ref, room: room)))
                return flush()
            }
            guard available else {
                sendUnavailable(ref: ref, room: room)
                return flush()
            }
            let started = monotonicSeconds()
            worker.bus.publish(room: room, from: user, text: text) { [self] result in
                worker.counters.observeBusLatency(seconds: monotonicSeconds() - started)
                switch result {
                case .success(let published):
                    if let ref { sendAfterRoom(.ack(ref: ref, room: room, seq: published.seq), room: room) }
                case .failure:
                    sendUnavailable(ref: ref, room: room)
                }
                flush()
            }
        }
    }

    private func history(_ room: String, before: HistoryPosition?, limit: Int, ref: String?) {
        guard permission.allows(room) else {
            return send(.error(ProtocolError(.forbidden, "your token does not allow this room", ref: ref, room: room)))
        }
        worker.history(room: room, before: before, limit: limit) { [self] result in
            switch result {
            case .success(let page):
                send(.history(room: room, messages: page.messages, more: page.more, ref: ref))
            case .failure:
                sendUnavailable(ref: ref, room: room)
            }
            flush()
        }
    }

    private func sendUnavailable(ref: String?, room: String) {
        var error = ProtocolError.busUnavailable
        error.ref = ref
        error.room = room
        send(.error(error))
    }

    /// Leaves every room once the connection is gone.
    func departed() {
        isOpen = false
        departedRooms()
        switch transport {
        case .webSocket(let webSocket):
            worker.unregister(self, idleRow: webSocket.activity?.row)
            webSocket.activity = nil
        case .eventStream:
            worker.unregister(self, idleRow: nil)
        case .engine(let fd):
            worker.unregister(self, idleRow: worker.engine!.idleRow(fd))
        }
    }

    // MARK: output

    /// Encodes and queues one frame (event); the caller flushes.
    func send(_ message: ServerMessage) {
        guard isOpen else { return }
        let allocator = Self.allocator
        switch transport {
        case .webSocket, .engine:
            write(FrameBytes.text(message, allocator: allocator))
        case .eventStream:
            var event = allocator.buffer(capacity: 256)
            if position.advance(by: message) { position.writeIDLine(into: &event) }
            EventStreamBytes.write(message, into: &event)
            write(event)
        }
    }

    /// Queues a WebSocket member's already framed message (the same bytes go to every
    /// WebSocket member of a room).
    func write(_ frame: ByteBuffer) {
        write(frame, frames: 1)
    }

    /// Queues `frames` WebSocket frames back to back (a busy room's window).
    func write(_ bytes: ByteBuffer, frames: Int) {
        guard isOpen, !closing else { return }
        countOut(frames: frames, bytes: bytes.readableBytes)
        switch transport {
        case .engine(let fd): worker.engine!.write(bytes, to: fd)
        case .webSocket, .eventStream: output?.write(wrapOutboundOut(bytes), promise: nil)
        }
    }

    private func countOut(frames: Int, bytes: Int) {
        worker.counters.messagesOut += frames
        worker.counters.bytesOut += bytes
    }

    /// Sends a frame that must follow what the room sent this connection so far (the ack
    /// of a send follows the message): behind the room's gathering window when it has one.
    private func sendAfterRoom(_ message: ServerMessage, room: String) {
        guard isOpen, !isEventStream else { return send(message) }
        let frame = FrameBytes.text(message, allocator: Self.allocator)
        if !worker.rooms.holdBehindWindow(frame, for: self, in: room) { write(frame) }
    }

    /// Queues an event stream member's room event: its own `id:` line (its position in
    /// all its rooms), then the event's bytes, shared with every such member of the room.
    func write(event: ByteBuffer, at mark: StreamMark) {
        guard let output, !closing else { return }
        position.set(mark)
        var id = output.channel.allocator.buffer(capacity: 32 + 40 * position.marks.count)
        position.writeIDLine(into: &id)
        countOut(frames: 1, bytes: id.readableBytes + event.readableBytes)
        output.write(wrapOutboundOut(id), promise: nil)
        output.write(wrapOutboundOut(event), promise: nil)
    }

    /// Queues a room's encoded message in this session's transport.
    func write(_ frame: RoomFrame) {
        switch transport {
        case .webSocket, .engine: write(frame.bytes)
        case .eventStream: write(event: frame.bytes, at: frame.mark)
        }
    }

    /// An event stream's heartbeat comment.
    func heartbeat() {
        guard let output, !closing else { return }
        output.writeAndFlush(wrapOutboundOut(EventStreamBytes.heartbeat), promise: nil)
    }

    func flush() {
        output?.flush()
        if case .engine(let fd) = transport {
            worker.engine!.flush(fd, awaitingJoins: awaitsJoins)
        }
        checkBacklog()
    }

    /// A join of this session waits for the bus (or for it to be reachable).
    var awaitsJoins: Bool { rooms.isJoining }

    /// Sends `bye` and closes: a WebSocket starts the close handshake with the matching
    /// close code; an event stream first tells EventSource to wait `retryMs` before it
    /// reconnects, then ends. The connection leaves its rooms at once, so nothing more is
    /// queued for it.
    func sayGoodbye(_ reason: ByeReason, retryMs: Int) {
        guard isOpen, !closing else { return }
        let message = ServerMessage.bye(reason: reason, retryMs: retryMs)
        if case .engine(let fd) = transport {
            let bye = FrameBytes.text(message, allocator: Self.allocator)
            closing = true
            departedRooms()
            return worker.engine!.close(fd, code: CloseCode.forBye(reason), after: bye)
        }
        guard let context else { return }
        closing = true
        let allocator = context.channel.allocator
        switch transport {
        case .webSocket(let webSocket):
            context.writeAndFlush(wrapOutboundOut(FrameBytes.text(message, allocator: allocator)), promise: nil)
            departedRooms()
            webSocket.close(code: CloseCode.forBye(reason))
        case .eventStream:
            var bye = allocator.buffer(capacity: 96)
            EventStreamBytes.writeRetry(milliseconds: retryMs, into: &bye)
            EventStreamBytes.write(message, into: &bye)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(bye)).whenComplete { _ in channel.close(promise: nil) }
            // A reader that takes nothing (a slow consumer) never lets that write complete.
            context.eventLoop.scheduleTask(in: WebSocketHandler.closeHandshakeTimeout) { channel.close(promise: nil) }
            departedRooms()
        case .engine:
            break
        }
    }

    /// Closes without `bye` (idle timeout; only WebSocket sessions are swept for it).
    func close(code: UInt16) {
        guard isOpen, !closing else { return }
        closing = true
        departedRooms()
        switch transport {
        case .webSocket(let webSocket): webSocket.close(code: code)
        case .eventStream: context?.close(promise: nil)
        case .engine(let fd): worker.engine!.close(fd, code: code, after: nil)
        }
    }

    /// Sends a WebSocket ping (idle check).
    func ping() {
        guard isOpen, !closing else { return }
        if case .engine(let fd) = transport { return worker.engine!.ping(fd) }
        guard let context, case .webSocket = transport else { return }
        context.writeAndFlush(wrapOutboundOut(FrameBytes.make(opcode: .ping, payload: ByteBuffer(), allocator: context.channel.allocator)), promise: nil)
    }

    /// Leaves every room; a room still being joined is undone when the bus answers.
    private func departedRooms() {
        for room in rooms.departAll() { quit(room) }
    }

    /// Out of the room table and the bus's count.
    private func quit(_ room: String) {
        worker.rooms.remove(self, from: room)
        worker.leave(room)
    }
}
