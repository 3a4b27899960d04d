import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The connection pipeline, read top to bottom:
/// HTTP -> upgrade at /ws (or /echo) -> frame aggregation -> WebSocket duties and UTF-8
/// check -> session (or echo).
enum ConnectionPipeline {
    /// What a WebSocket endpoint allows and what its last stage is.
    private struct Endpoint {
        var maxMessageBytes: Int
        var maxFragments: Int
        var isEcho: Bool
    }

    static func configure(_ channel: any Channel, worker: NIOLoopBound<Worker>) -> EventLoopFuture<Void> {
        let config = worker.value.settings.config
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
        let upgrader = WebSocketUpgrader(
            maxFrameSize: { head in endpoint(head)?.maxMessageBytes ?? chat.maxMessageBytes },
            shouldUpgrade: { channel, head in
                guard let selected = endpoint(head), selected.isEcho || Identity.user(in: RequestTarget(head.uri)) != nil else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                var headers = HTTPHeaders()
                if head.headers[canonicalForm: "Sec-WebSocket-Protocol"].contains("chatgw.v1") {
                    headers.add(name: "Sec-WebSocket-Protocol", value: "chatgw.v1")
                }
                return channel.eventLoop.makeSucceededFuture(headers)
            },
            configure: { channel, head in
                guard let selected = endpoint(head) else { return }
                let activity = ConnectionActivity()
                try addWebSocketHandlers(to: channel, endpoint: selected, activity: activity)
                if selected.isEcho {
                    try channel.pipeline.syncOperations.addHandler(EchoHandler())
                } else {
                    let worker = worker.value
                    let user = Identity.user(in: RequestTarget(head.uri)) ?? "guest"
                    try channel.pipeline.syncOperations.addHandler(
                        SessionHandler(user: user, connectionID: worker.makeConnectionID(), activity: activity, worker: worker))
                }
            }
        )
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                withServerUpgrade: (upgraders: [upgrader], completionHandler: { _ in }))
            try channel.pipeline.syncOperations.addHandler(HTTPHandler(echoEnabled: echo != nil))
        }
    }

    /// Reassembly of fragments, then the WebSocket duties.
    private static func addWebSocketHandlers(to channel: any Channel, endpoint: Endpoint, activity: ConnectionActivity) throws {
        let pipeline = channel.pipeline.syncOperations
        // The plain-HTTP handler sits where the WebSocket handlers go; it is done now.
        _ = pipeline.removeHandler(context: try pipeline.context(handlerType: HTTPHandler.self))
        try pipeline.addHandler(FrameRuleChecker())
        try pipeline.addHandler(NIOWebSocketFrameAggregator(
            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: endpoint.maxFragments, maxAccumulatedFrameSize: endpoint.maxMessageBytes))
        try pipeline.addHandler(WebSocketHandler(activity: activity))
    }
}
