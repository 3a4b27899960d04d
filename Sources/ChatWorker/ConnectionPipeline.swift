import ChatAuth
import ChatProtocol
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The connection pipeline, read top to bottom: the HTTP request decoder and the first
/// request's handler; an upgrade at /ws (or /echo) then becomes the frame decoder -> frame
/// rules and aggregation -> WebSocket duties and UTF-8 check -> session (or echo), and any
/// other request the HTTP stack and handler (health, API, web page, refusals).
enum ConnectionPipeline {
    typealias Endpoint = FirstRequestHandler.Endpoint

    /// NIO keeps each connection's last read buffer for the next read, so its first size is
    /// memory every idle member holds. Chat frames and handshakes are small; reads that fill
    /// the buffer grow it (up to 64 KiB) for the rare big message.
    static let readBuffers = AdaptiveRecvByteBufferAllocator(
        minimum: 64,
        initial: 256,
        maximum: 65_536
    )

    /// NIO's handshake rules (key, version, the accept value); the decision is ours.
    private static let handshake = NIOWebSocketServerUpgrader(
        automaticErrorHandling: false,
        shouldUpgrade: { channel, _ in channel.eventLoop.makeSucceededFuture(HTTPHeaders()) },
        upgradePipelineHandler: { channel, _ in channel.eventLoop.makeSucceededVoidFuture() })

    static func configure(_ channel: any Channel, worker bound: NIOLoopBound<Worker>) -> EventLoopFuture<Void> {
        let worker = bound.value
        let config = worker.settings.config
        let chat = Endpoint(maxMessageBytes: config.limits.maxFrameBytes, maxFragments: 1_000, isEcho: false)
        // The conformance suite sends 16 MiB messages in 64-byte fragments.
        let echo = config.conformance.echo
            ? Endpoint(maxMessageBytes: config.conformance.maxMessageBytes, maxFragments: 1 << 20, isEcho: true) : nil
        let origins = config.server.originList
        let verifier = worker.verifier
        let policy = FirstRequestHandler.Policy(
            endpoint: { path in
                switch path {
                case "/ws": chat
                case "/echo": echo
                default: nil
                }
            },
            decide: { channel, head, target, selected in
                var headers = HTTPHeaders()
                if head.headers[canonicalForm: "Sec-WebSocket-Protocol"].contains("chatgw.v1") {
                    headers.add(name: "Sec-WebSocket-Protocol", value: "chatgw.v1")
                }
                if selected.isEcho { return channel.eventLoop.makeSucceededFuture(.accept(headers, user: nil)) }
                return Identity.decide(head, target: target, accepted: headers, origins: origins, verifier: verifier, on: channel.eventLoop)
            },
            configure: { channel, selected, user, target in
                try addWebSocketStages(to: channel, endpoint: selected, user: user, target: target, worker: worker)
            },
            makeHTTPHandler: { refusal in HTTPHandler(worker: worker, refusal: refusal) }
        )
        let outbound = config.limits.outboundBufferBytes
        return channel.eventLoop.makeCompletedFuture {
            // Set here rather than as the bootstrap's childChannelOptions, which NIO applies
            // through a chain of futures per connection (3.5% of a worker's CPU in a
            // handshake storm).
            try channel.syncOptions?.setOption(.writeBufferWaterMark, value: .init(low: outbound / 2, high: outbound))
            try channel.syncOptions?.setOption(.recvAllocator, value: readBuffers)
            let pipeline = channel.pipeline.syncOperations
            try pipeline.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes)))
            try pipeline.addHandler(FirstRequestHandler(policy: policy, handshake: handshake))
        }
    }

    /// After the 101: frame decoder -> frame rules and aggregation -> WebSocket duties and
    /// UTF-8 check -> the session (or, on /echo, the echo).
    private static func addWebSocketStages(to channel: any Channel, endpoint: Endpoint, user: AuthorizedUser?, target: RequestTarget,
                                           worker: Worker) throws {
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: endpoint.maxMessageBytes)))
        try pipeline.addHandler(FrameRuleChecker(aggregator: NIOWebSocketFrameAggregator(
            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: endpoint.maxFragments, maxAccumulatedFrameSize: endpoint.maxMessageBytes)))
        let webSocket = WebSocketHandler()
        try pipeline.addHandler(webSocket)
        guard !endpoint.isEcho else { return try pipeline.addHandler(EchoHandler()) }
        guard let user else { throw ChannelError.inappropriateOperationForState }
        let session = SessionHandler(user: user, connectionID: worker.makeConnectionID(), transport: .webSocket(webSocket), worker: worker)
        session.openingJoins = target.openingJoins
        try pipeline.addHandler(session)
    }
}
