import ChatAuth
import ChatProtocol
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The first request of a connection. A WebSocket upgrade to one of our endpoints is
/// answered here, and the connection becomes a WebSocket with no HTTP handler left in its
/// pipeline; any other request gets the HTTP stack (NIO's response encoder, pipelining,
/// header validation and protocol error handling, then our `HTTPHandler`) installed behind
/// this handler and continues there.
///
/// NIO's `HTTPServerUpgradeHandler` does the same with that whole stack in place from the
/// start, and takes it down through a chain of futures: measured, a handshake cost about
/// twice the server CPU it does here. NIO still does the parsing (llhttp) and the
/// handshake rules (key and version checks, the accept value: `NIOWebSocketServerUpgrader`).
final class FirstRequestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundOut = ByteBuffer

    /// What an upgrade request is decided on: the endpoint of its path, or nil for "not
    /// ours" (the HTTP handler answers it), and the decision (see `UpgradeDecision`). The
    /// request target is parsed once and handed to both.
    struct Policy {
        var endpoint: (Substring) -> Endpoint?
        var decide: (Channel, HTTPRequestHead, RequestTarget, Endpoint) -> EventLoopFuture<UpgradeDecision>
        /// Adds the WebSocket stages once the 101 is written, for the accepted user (and the
        /// request's target: the joins in its URL).
        var configure: (Channel, Endpoint, AuthorizedUser?, RequestTarget) throws -> Void
        /// The plain HTTP handler; it answers the first request with the refusal, if any.
        var makeHTTPHandler: (ProtocolError?) -> HTTPHandler
    }

    /// A WebSocket endpoint: what it allows and what its last stage is.
    struct Endpoint {
        var maxMessageBytes: Int
        var maxFragments: Int
        var isEcho: Bool
    }

    private struct Upgrade {
        var head: HTTPRequestHead
        var target: RequestTarget
        var endpoint: Endpoint
        /// The response's headers once accepted (Upgrade, Connection, Sec-WebSocket-Accept, ...).
        var accepted: HTTPHeaders?
        var user: AuthorizedUser?
        var endSeen = false
    }

    private enum State {
        case waitingForHead
        case upgrading(Upgrade)
        case done
    }

    private let policy: Policy
    private let handshake: NIOWebSocketServerUpgrader
    private var state = State.waitingForHead

    init(policy: Policy, handshake: NIOWebSocketServerUpgrader) {
        self.policy = policy
        self.handshake = handshake
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch (state, part) {
        case (.waitingForHead, .head(let head)):
            guard Self.asksForWebSocket(head) else { return continueAsHTTP(context: context, replaying: [part]) }
            let target = RequestTarget(head.uri)
            guard let endpoint = policy.endpoint(target.path) else { return continueAsHTTP(context: context, replaying: [part]) }
            state = .upgrading(Upgrade(head: head, target: target, endpoint: endpoint))
            decide(context: context, head: head, target: target, endpoint: endpoint)
        case (.upgrading(var upgrade), .end):
            upgrade.endSeen = true
            state = .upgrading(upgrade)
            finishIfReady(context: context)
        case (.upgrading, .body):
            break   // a body on a GET upgrade means nothing; it is dropped
        case (.waitingForHead, _), (.done, _), (.upgrading, .head):
            context.fireChannelRead(data)
        }
    }

    /// The request decoder failed before any HTTP handler was in place (garbage, or a head
    /// over NIO's 80 KiB limit): 400 and close, as NIO's protocol error handler would.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard case .done = state else {
            state = .done
            if error is HTTPParserError {
                let answer = HTTPAnswer(status: .badRequest, body: ByteBuffer()).bytes(context.channel.allocator)
                context.writeAndFlush(wrapOutboundOut(answer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
            return
        }
        context.fireErrorCaught(error)
    }

    // MARK: upgrade

    private static func asksForWebSocket(_ head: HTTPRequestHead) -> Bool {
        head.method == .GET
            && head.headers[canonicalForm: "Upgrade"].contains { $0.lowercased() == "websocket" }
            && head.headers[canonicalForm: "Connection"].contains { $0.lowercased() == "upgrade" }
    }

    private func decide(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget, endpoint: Endpoint) {
        let channel = context.channel
        let decide = policy.decide
        let decision = handshake.buildUpgradeResponse(channel: channel, upgradeRequest: head, initialResponseHeaders: HTTPHeaders())
            .assumeIsolated().flatMap { accept -> EventLoopFuture<UpgradeDecision> in
                decide(channel, head, target, endpoint).map { decision in
                    guard case .accept(var headers, let user) = decision else { return decision }
                    headers.add(contentsOf: accept)
                    return .accept(headers, user: user)
                }
            }
        // Usually complete already (no token to verify): then this runs right here.
        decision.whenComplete { [self] result in
            guard case .upgrading(var upgrade) = state else { return }
            let replay: [HTTPServerRequestPart] = upgrade.endSeen ? [.head(upgrade.head), .end(nil)] : [.head(upgrade.head)]
            switch result {
            case .success(.accept(let headers, let user)):
                upgrade.accepted = headers
                upgrade.user = user
                state = .upgrading(upgrade)
                finishIfReady(context: context)
            case .success(.refuse(let refusal)):
                continueAsHTTP(context: context, replaying: replay, refusal: refusal)
            case .failure:
                // Not a valid handshake: the HTTP handler answers 426 at a WebSocket endpoint.
                continueAsHTTP(context: context, replaying: replay, refusal: nil)
            }
        }
    }

    private func finishIfReady(context: ChannelHandlerContext) {
        guard case .upgrading(let upgrade) = state, upgrade.endSeen, let headers = upgrade.accepted else { return }
        state = .done
        guard context.channel.isActive else { return }
        var response = context.channel.allocator.buffer(capacity: 160)
        HTTPAnswer.writeHead(status: .switchingProtocols, headers: headers, into: &response)
        // Not flushed yet: the session's hello goes out in the same write(2).
        context.write(wrapOutboundOut(response), promise: nil)
        do {
            try policy.configure(context.channel, upgrade.endpoint, upgrade.user, upgrade.target)
            context.flush()
            let pipeline = context.pipeline.syncOperations
            let decoder = try pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self)
            pipeline.removeHandler(context: context, promise: nil)
            // Bytes that came after the request (the first frames) go on to the frame decoder
            // in a later loop task, after this read's read-complete: another one lets the
            // stages above flush what they answered.
            let removed = context.eventLoop.makePromise(of: Void.self)
            pipeline.removeHandler(context: decoder, promise: removed)
            let channel = context.channel
            removed.futureResult.assumeIsolated().whenSuccess { channel.pipeline.syncOperations.fireChannelReadComplete() }
        } catch {
            context.close(promise: nil)
        }
    }

    // MARK: plain HTTP

    private func continueAsHTTP(context: ChannelHandlerContext, replaying parts: [HTTPServerRequestPart], refusal: ProtocolError? = nil) {
        state = .done
        do {
            let handlers: [any ChannelHandler] = [
                HTTPResponseEncoder(), HTTPServerPipelineHandler(), NIOHTTPResponseHeadersValidator(),
                HTTPServerProtocolErrorHandler(), policy.makeHTTPHandler(refusal),
            ]
            try context.pipeline.syncOperations.addHandlers(handlers, position: .after(self))
        } catch {
            return context.close(promise: nil)
        }
        for part in parts { context.fireChannelRead(wrapInboundOut(part)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
