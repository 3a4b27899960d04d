import ChatAuth
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The connection pipeline, read top to bottom:
/// HTTP -> upgrade at /ws (or /echo) -> frame rules and aggregation -> WebSocket duties
/// and UTF-8 check -> session (or echo). Requests that are not upgrades end at the HTTP
/// handler (health, API, web page, refusals).
enum ConnectionPipeline {
    /// What a WebSocket endpoint allows and what its last stage is.
    private struct Endpoint {
        var maxMessageBytes: Int
        var maxFragments: Int
        var isEcho: Bool
    }

    static func configure(_ channel: any Channel, worker bound: NIOLoopBound<Worker>) -> EventLoopFuture<Void> {
        let worker = bound.value
        let config = worker.settings.config
        let verdict = NIOLoopBound(UpgradeVerdict(), eventLoop: channel.eventLoop)
        let chat = Endpoint(maxMessageBytes: config.limits.maxFrameBytes, maxFragments: 1_000, isEcho: false)
        // The conformance suite sends 16 MiB messages in 64-byte fragments.
        let echo = config.conformance.echo
            ? Endpoint(maxMessageBytes: config.conformance.maxMessageBytes, maxFragments: 1 << 20, isEcho: true) : nil
        let endpoint: @Sendable (HTTPRequestHead) -> Endpoint? = { head in
            switch RequestTarget(head.uri).path {
            case "/ws": chat
            case "/echo": echo
            default: nil
            }
        }
        let origins = config.server.originList
        let verifier = worker.verifier
        let upgrader = WebSocketUpgrader(
            maxFrameSize: { head in endpoint(head)?.maxMessageBytes ?? chat.maxMessageBytes },
            shouldUpgrade: { channel, head in
                guard let selected = endpoint(head) else { return channel.eventLoop.makeSucceededFuture(nil) }
                var headers = HTTPHeaders()
                if head.headers[canonicalForm: "Sec-WebSocket-Protocol"].contains("chatgw.v1") {
                    headers.add(name: "Sec-WebSocket-Protocol", value: "chatgw.v1")
                }
                if selected.isEcho { return channel.eventLoop.makeSucceededFuture(headers) }
                if let refusal = Identity.originRefusal(head, allowed: origins) {
                    verdict.value.refusal = refusal
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                let target = RequestTarget(head.uri)
                guard let verifier else {
                    switch Identity.fromQuery(target) {
                    case .success(let user): verdict.value.user = user
                    case .failure(let refusal): verdict.value.refusal = refusal
                    }
                    return channel.eventLoop.makeSucceededFuture(verdict.value.user == nil ? nil : headers)
                }
                guard let token = Identity.token(in: head, target: target) else {
                    verdict.value.refusal = HTTPRefusal(status: .unauthorized, code: "unauthorized", message: "a token is required (?token= or Authorization: Bearer)")
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                // Verification is async (jwt-kit); its answer is applied back on the
                // connection's loop, where the verdict lives.
                let accepted = headers
                let promise = channel.eventLoop.makePromise(of: Result<AuthorizedUser, AuthRefusal>.self)
                promise.completeWithTask { await verifier.verify(token) }
                return promise.futureResult.map { result -> HTTPHeaders? in
                    switch result {
                    case .success(let user):
                        verdict.value.user = user
                        return accepted
                    case .failure(let refusal):
                        verdict.value.refusal = HTTPRefusal(status: .unauthorized, code: "unauthorized", message: refusal.reason)
                        return nil
                    }
                }
            },
            configure: { channel, head in
                guard let selected = endpoint(head) else { return }
                let webSocket = try addWebSocketHandlers(to: channel, endpoint: selected)
                if selected.isEcho {
                    try channel.pipeline.syncOperations.addHandler(EchoHandler())
                    return
                }
                guard let user = verdict.value.user else { throw ChannelError.inappropriateOperationForState }
                let worker = bound.value
                try channel.pipeline.syncOperations.addHandler(
                    SessionHandler(user: user, connectionID: worker.makeConnectionID(), webSocket: webSocket, worker: worker))
            }
        )
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                withServerUpgrade: (upgraders: [upgrader], completionHandler: { _ in }))
            try channel.pipeline.syncOperations.addHandler(HTTPHandler(worker: worker, verdict: verdict.value))
        }
    }

    /// Frame rules, reassembly of fragments, then the WebSocket duties.
    private static func addWebSocketHandlers(to channel: any Channel, endpoint: Endpoint) throws -> WebSocketHandler {
        let pipeline = channel.pipeline.syncOperations
        // The plain-HTTP handler sits where the WebSocket handlers go; it is done now.
        _ = pipeline.removeHandler(context: try pipeline.context(handlerType: HTTPHandler.self))
        try pipeline.addHandler(FrameRuleChecker(aggregator: NIOWebSocketFrameAggregator(
            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: endpoint.maxFragments, maxAccumulatedFrameSize: endpoint.maxMessageBytes)))
        let webSocket = WebSocketHandler()
        try pipeline.addHandler(webSocket)
        return webSocket
    }
}
