import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The connection pipeline, read top to bottom:
/// HTTP -> upgrade at /ws -> frame aggregation -> WebSocket duties and UTF-8 check -> session.
enum ConnectionPipeline {
    static func configure(_ channel: any Channel, worker: NIOLoopBound<Worker>) -> EventLoopFuture<Void> {
        let settings = worker.value.settings
        let upgrader = WebSocketUpgrader(
            maxFrameSize: settings.limits.maxFrameBytes,
            shouldUpgrade: { channel, head in
                let target = RequestTarget(head.uri)
                guard target.path == "/ws", Identity.user(in: target) != nil else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                var headers = HTTPHeaders()
                if head.headers[canonicalForm: "Sec-WebSocket-Protocol"].contains("chatgw.v1") {
                    headers.add(name: "Sec-WebSocket-Protocol", value: "chatgw.v1")
                }
                return channel.eventLoop.makeSucceededFuture(headers)
            },
            configure: { channel, head in
                let worker = worker.value
                let user = Identity.user(in: RequestTarget(head.uri)) ?? "guest"
                let activity = ConnectionActivity()
                try addWebSocketHandlers(to: channel, maxMessageBytes: settings.limits.maxFrameBytes, activity: activity)
                try channel.pipeline.syncOperations.addHandler(
                    SessionHandler(user: user, connectionID: worker.makeConnectionID(), activity: activity, worker: worker))
            }
        )
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                withServerUpgrade: (upgraders: [upgrader], completionHandler: { _ in }))
            try channel.pipeline.syncOperations.addHandler(HTTPHandler())
        }
    }

    /// Reassembly of fragments, then the WebSocket duties.
    private static func addWebSocketHandlers(to channel: any Channel, maxMessageBytes: Int, activity: ConnectionActivity) throws {
        let pipeline = channel.pipeline.syncOperations
        // The plain-HTTP handler sits where the WebSocket handlers go; it is done now.
        _ = pipeline.removeHandler(context: try pipeline.context(handlerType: HTTPHandler.self))
        try pipeline.addHandler(NIOWebSocketFrameAggregator(
            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 1_000, maxAccumulatedFrameSize: maxMessageBytes))
        try pipeline.addHandler(WebSocketHandler(activity: activity))
    }
}
