import ChatAuth
import ChatProtocol
import ChatSystem
import NIOCore
import NIOHTTP1

// The event stream transport's HTTP side (docs/PROTOCOL.md "SSE"): `GET /sse` opens the
// stream, and since EventSource cannot send, `POST /sse/send` and `GET /sse/history`
// stand in for the WebSocket `send` and `history` requests. Every one of them identifies
// its user as `/ws` does.
extension HTTPHandler {
    /// Runs `body` with the requester, or refuses the request as an upgrade at `/ws` would be.
    func authorized(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget, guests: Bool = true,
                    _ body: @escaping (AuthorizedUser) -> Void) {
        Identity.authorize(head, target: target, origins: worker.settings.config.server.originList,
                           verifier: worker.verifier, guests: guests, on: context.eventLoop)
            .assumeIsolated().whenSuccess { [self] result in
                switch result {
                case .success(let user): body(user)
                case .failure(let refusal): refuse(context: context, head: head, refusal)
                }
            }
    }

    /// `GET /sse?rooms=a,b[&history=N]`, with `Last-Event-ID` (or `?last_event_id=`) to resume.
    func openEventStream(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget, user: AuthorizedUser) {
        guard context.channel.isActive else { return }
        let lastEventID = head.headers.first(name: "Last-Event-ID").map { Substring($0) } ?? target.query["last_event_id"]
        let request = EventStreamRequest.decode(rooms: target.query["rooms"], lastEventID: lastEventID, history: target.query["history"])
        let session = SessionHandler(user: user, connectionID: worker.makeConnectionID(), transport: .eventStream, worker: worker)
        streaming = true
        do {
            try EventStreamPipeline.install(session, from: context)
        } catch {
            return context.close(promise: nil)
        }
        session.open(with: request.requests)
    }

    /// `POST /sse/send`: a WebSocket `send` without the membership rule (the poster's stream
    /// may be held by another worker, which this one cannot see), rate-limited per user.
    func streamedSend(context: ChannelHandlerContext, head: HTTPRequestHead, user: AuthorizedUser) {
        guard let send = decodedBody(context: context, head: head, StreamedSend.decode) else { return }
        worker.counters.messagesIn += 1
        guard worker.sendRates.take(user.name, now: monotonicSeconds()) else {
            return refuse(context: context, head: head, ProtocolError(
                .rateLimited, "slow down: at most \(worker.settings.limits.ratePerSecond) messages per second", ref: send.ref, room: send.room))
        }
        guard user.rooms.allows(send.room) else {
            return refuse(context: context, head: head, ProtocolError(.forbidden, "your token does not allow this room", ref: send.ref, room: send.room))
        }
        worker.whenBusAvailable(until: worker.busWaitDeadline()) { [self] available in
            guard available else { return refuse(context: context, head: head, .busUnavailable) }
            let started = monotonicSeconds()
            worker.bus.publish(room: send.room, from: user.name, text: send.text) { [self] result in
                worker.counters.observeBusLatency(seconds: monotonicSeconds() - started)
                switch result {
                case .success(let published):
                    sendJSON(context: context, head: head) { json in
                        json.field("type", "ack")
                        json.field("room", send.room)
                        json.field("seq", published.seq)
                        json.field("epoch", published.epoch)
                        json.field("ref", ifPresent: send.ref)
                    }
                case .failure:
                    refuse(context: context, head: head, .busUnavailable)
                }
            }
        }
    }

    /// `GET /sse/history?room=R[&before_epoch=E&before_seq=S][&limit=N]`: the `history`
    /// answer, as the API's message pages give it.
    func streamHistory(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget, user: AuthorizedUser) {
        let room: String
        do {
            room = try Names.checkedRoom(String(target.query["room"] ?? ""))
        } catch {
            return refuse(context: context, head: head, error)
        }
        guard user.rooms.allows(room) else {
            return refuse(context: context, head: head, ProtocolError(.forbidden, "your token does not allow this room", room: room))
        }
        messages(context: context, head: head, room: room, target: target)
    }
}
