import ChatAuth
import ChatArchive
import ChatBus
import ChatProtocol
import ChatSystem
import NIOCore
import NIOWebSocket

/// One client's conversation: turns requests into actions on the worker's rooms and
/// the bus, and writes the answers. Lives on the worker's single event loop, like
/// everything it touches.
final class SessionHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketMessage
    typealias OutboundOut = ByteBuffer

    private enum Membership {
        /// Asked the bus; `joined` not sent yet.
        case joining
        case joined
    }

    let user: String
    let permission: RoomPermission
    let connectionID: String
    /// Also holds the connection's row in the worker's idle table.
    let webSocket: WebSocketHandler
    private let worker: Worker
    /// Set while this session waits in the room table's list of members to flush.
    var flushQueued = false
    private var context: ChannelHandlerContext?
    /// Where this session's frames enter the pipeline: the context next to the head (the
    /// frame decoder's; everything between it and here is inbound-only), so a write or a
    /// flush does not walk every stage in between, once per member per message.
    private var output: ChannelHandlerContext?
    private var rooms = Memberships<Membership>()
    private var bucket: TokenBucket
    private var flood: FloodDetector
    private var closing = false
    /// While a join is filled from the archive, everything else waits here, so that the
    /// join's replay comes before any live message.
    private var holding: [ByteBuffer]?

    init(user: AuthorizedUser, connectionID: String, webSocket: WebSocketHandler, worker: Worker) {
        self.webSocket = webSocket
        self.user = user.name
        self.permission = user.rooms
        self.connectionID = connectionID
        self.worker = worker
        let limits = worker.settings.limits
        bucket = TokenBucket(rate: limits.ratePerSecond, burst: limits.burst, now: monotonicSeconds())
        flood = FloodDetector(limit: limits.floodViolations)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
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
        send(.hello(user: user, conn: connectionID, heartbeatSeconds: worker.settings.heartbeatSeconds))
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
        guard !closing else { return }
        worker.counters.messagesIn += 1
        switch unwrapInboundIn(data) {
        case .binary:
            send(.error(ProtocolError(.badFrame, "frames must be text holding one JSON object")))
        case .text(let text):
            switch ClientMessage.decode(text, maxTextBytes: worker.settings.limits.maxTextBytes) {
            case .success(let request):
                if case .ping(let ref) = request {
                    send(.pong(ref: ref))
                } else if admit(request) {
                    handle(request)
                }
            case .failure(let error):
                send(.error(error))
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flush()
    }

    private func releaseHeld() {
        guard let held = holding else { return }
        holding = nil
        for frame in held { write(frame) }
        flush()
    }

    /// Still over the outbound buffer after a flush gave the kernel all it would take:
    /// this reader is too slow for its rooms. Cut it off rather than let its backlog grow
    /// or hold anyone else back. (Judged after the flush, not on every write, so a burst
    /// queued within one loop tick does not count against a client that reads.)
    private func checkBacklog() {
        guard let context, !closing, !context.channel.isWritable else { return }
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
        if rooms[room] == .joined, let local = worker.rooms.room(room) {
            send(.joined(room: room, seq: local.lastSeq, epoch: local.epoch, members: local.knownMembers, ref: ref))
            return
        }
        guard rooms[room] == nil else {
            return send(.error(ProtocolError(.badJSON, "already joining this room", ref: ref, room: room)))
        }
        guard permission.allows(room) else {
            return send(.error(ProtocolError(.forbidden, "your token does not allow this room", ref: ref, room: room)))
        }
        guard rooms.count < worker.settings.limits.roomsPerConnection else {
            return send(.error(ProtocolError(.tooManyRooms, "at most \(worker.settings.limits.roomsPerConnection) rooms per connection", ref: ref, room: room)))
        }
        guard worker.bus.isAvailable else { return sendUnavailable(ref: ref, room: room) }
        rooms[room] = .joining
        worker.counters.joins += 1
        worker.bus.join(room: room, since: since, epoch: epoch, history: history, members: 1) { [self] result in
            guard context != nil, rooms[room] == .joining else {
                // Left or disconnected while the bus was answering: undo the count.
                if case .success = result { worker.bus.leave(room: room, members: 1) }
                return
            }
            switch result {
            case .success(let answer):
                rooms[room] = .joined
                worker.rooms.add(self, to: room, snapshot: answer.room)
                if let gap = answer.gap, let since, let archive = worker.archive {
                    // The history no longer reaches back to `since`: fill from the archive
                    // (the rest of the client's old epoch, and the current epoch's part the
                    // history lost). Live messages that arrive meanwhile wait behind it.
                    holding = []
                    let oldEpoch = epoch.flatMap { $0 == gap.epoch ? nil : $0 }
                    context!.eventLoop.makeFutureWithTask { () async throws -> [[RoomMessage]] in
                        var tail: [RoomMessage] = []
                        if let oldEpoch {
                            tail = try await archive.range(room: room, epoch: oldEpoch, from: since + 1, to: Int(Int32.max))
                        }
                        let filled = gap.from > 0 ? try await archive.range(room: room, epoch: gap.epoch, from: gap.from, to: gap.to) : []
                        return [tail, filled]
                    }
                    .assumeIsolated()
                    .whenComplete { [self] result in
                        let parts = (try? result.get()) ?? [[], []]
                        let (tail, filled) = (parts[0], parts[1])
                        sendJoin(room, answer: answer, previousEpoch: tail, archived: filled, ref: ref)
                        releaseHeld()
                    }
                    return
                }
                sendJoin(room, answer: answer, previousEpoch: [], archived: [], ref: ref)
            case .failure:
                rooms[room] = nil
                sendUnavailable(ref: ref, room: room)
            }
            flush()
        }
    }

    /// `joined`, then what the room's history could not give (from the archive: the rest
    /// of the client's previous epoch, then the current epoch's lost part, with a `gap`
    /// only for what the archive lacks too), then the replay.
    private func sendJoin(_ room: String, answer: JoinResult, previousEpoch: [RoomMessage], archived: [RoomMessage], ref: String?) {
        send(.joined(room: room, seq: answer.room.seq, epoch: answer.room.epoch, members: answer.room.members, ref: ref))
        for message in previousEpoch { send(.message(message)) }
        if let gap = answer.gap {
            let firstArchived = archived.first?.seq ?? gap.to + 1
            let lastArchived = archived.last?.seq ?? gap.to
            if gap.from == 0 || firstArchived > gap.from {
                send(.gap(room: room, from: gap.from, to: gap.from == 0 ? gap.to : min(gap.to, firstArchived - 1), epoch: gap.epoch))
            }
            for message in archived { send(.message(message)) }
            if !archived.isEmpty && lastArchived < gap.to {
                send(.gap(room: room, from: lastArchived + 1, to: gap.to, epoch: gap.epoch))
            }
        }
        for message in answer.replay {
            send(.message(message))
        }
        worker.counters.deliveries += answer.replay.count + archived.count + previousEpoch.count
        flush()
    }

    private func leave(_ room: String, ref: String?) {
        guard let membership = rooms.removeValue(forKey: room) else {
            return send(.error(ProtocolError(.notJoined, "not a member of this room", ref: ref, room: room)))
        }
        if membership == .joined {
            worker.rooms.remove(self, from: room)
            worker.bus.leave(room: room, members: 1)
        }
        send(.left(room: room, ref: ref))
    }

    private func publish(_ room: String, text: String, ref: String?) {
        guard rooms[room] == .joined else {
            return send(.error(ProtocolError(.notJoined, "join the room before sending to it", ref: ref, room: room)))
        }
        guard worker.bus.isAvailable else { return sendUnavailable(ref: ref, room: room) }
        let started = monotonicSeconds()
        worker.bus.publish(room: room, from: user, text: text) { [self] result in
            worker.counters.observeBusLatency(seconds: monotonicSeconds() - started)
            switch result {
            case .success(let published):
                if let ref { send(.ack(ref: ref, room: room, seq: published.seq)) }
            case .failure:
                sendUnavailable(ref: ref, room: room)
            }
            flush()
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
        send(.error(ProtocolError(.unavailable, "the message bus is unreachable; retry shortly", ref: ref, room: room)))
    }

    /// Leaves every room once the connection is gone.
    private func departed() {
        departedRooms()
        worker.unregister(self)
    }

    // MARK: output

    /// Encodes and queues one frame; the caller flushes.
    func send(_ message: ServerMessage) {
        guard let context else { return }
        let allocator = context.channel.allocator
        write(FrameBytes.text(message.encoded(allocator), allocator: allocator))
    }

    /// Queues an already framed message (the same bytes go to every member of a room).
    func write(_ frame: ByteBuffer) {
        guard let output, !closing else { return }
        if holding != nil {
            holding!.append(frame)
            return
        }
        worker.counters.messagesOut += 1
        worker.counters.bytesOut += frame.readableBytes
        output.write(wrapOutboundOut(frame), promise: nil)
    }

    func flush() {
        output?.flush()
        checkBacklog()
    }

    /// Sends `bye` and starts the close handshake with the matching close code. The
    /// connection leaves its rooms at once, so nothing more is queued for it.
    func sayGoodbye(_ reason: ByeReason, retryMs: Int) {
        guard let context, !closing else { return }
        closing = true
        let allocator = context.channel.allocator
        let bye = FrameBytes.text(ServerMessage.bye(reason: reason, retryMs: retryMs).encoded(allocator), allocator: allocator)
        context.writeAndFlush(wrapOutboundOut(bye), promise: nil)
        departedRooms()
        webSocket.close(code: CloseCode.forBye(reason))
    }

    /// Closes without `bye` (idle timeout).
    func close(code: UInt16) {
        guard context != nil, !closing else { return }
        closing = true
        departedRooms()
        webSocket.close(code: code)
    }

    /// Sends a WebSocket ping (idle check).
    func ping() {
        guard let context, !closing else { return }
        context.writeAndFlush(wrapOutboundOut(FrameBytes.make(opcode: .ping, payload: ByteBuffer(), allocator: context.channel.allocator)), promise: nil)
    }

    /// Leaves every room; a room still being joined is undone when the bus answers.
    private func departedRooms() {
        for room in rooms.rooms(in: .joined) {
            worker.rooms.remove(self, from: room)
            worker.bus.leave(room: room, members: 1)
        }
        rooms.removeAll()
    }
}
