import ChatProtocol
import Logging
import NIOCore
import NIOPosix

/// The worker's link to the relay over its Unix socket, reconnecting with backoff.
public final class RelayBusClient: ArchiverBus {
    private enum Pending {
        case join((Result<JoinResult, BusError>) -> Void)
        case publish((Result<Published, BusError>) -> Void)
        case fetch((Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void)
        case rooms((Result<[String], BusError>) -> Void)
    }

    public weak var delegate: BusDelegate?
    private let socketPath: String
    private let workerName: String
    private let eventLoop: any EventLoop
    private let logger: Logger
    private var channel: (any Channel)?
    private var pending: [UInt32: Pending] = [:]
    private var nextRequest: UInt32 = 0
    private var backoff = ReconnectBackoff()
    /// This tick's frames, written and flushed together after it.
    private var outgoing: ByteBuffer?

    public init(socketPath: String, workerName: String, eventLoop: any EventLoop, logger: Logger) {
        self.socketPath = socketPath
        self.workerName = workerName
        self.eventLoop = eventLoop
        self.logger = logger
    }

    public var isAvailable: Bool { channel != nil }

    public func start() {
        connect()
    }


    public func join(room: String, since: Int?, epoch: String?, history: Int, members: Int,
                     completion: @escaping (Result<JoinResult, BusError>) -> Void) {
        guard let request = register(.join(completion)) else { return completion(.failure(.unavailable)) }
        send(.join(request: request, room: room, since: since, epoch: epoch, history: history, members: members))
    }

    public func leave(room: String, members: Int) {
        guard channel != nil else { return }
        send(.leave(room: room, members: members))
    }

    public func publish(room: String, from: String, text: String, completion: @escaping (Result<Published, BusError>) -> Void) {
        guard let request = register(.publish(completion)) else { return completion(.failure(.unavailable)) }
        send(.publish(request: request, room: room, from: from, text: text))
    }

    public func info(room: String, completion: @escaping (Result<RoomSnapshot, BusError>) -> Void) {
        let answer: (Result<JoinResult, BusError>) -> Void = { completion($0.map(\.room)) }
        guard let request = register(.join(answer)) else { return completion(.failure(.unavailable)) }
        send(.info(request: request, room: room))
    }

    public func subscribeAll() {
        send(.subscribeAll)
    }

    public func listRooms(completion: @escaping (Result<[String], BusError>) -> Void) {
        guard let request = register(.rooms(completion)) else { return completion(.failure(.unavailable)) }
        send(.listRooms(request: request))
    }

    public func fetch(room: String, before: HistoryPosition?, limit: Int,
                      completion: @escaping (Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void) {
        guard let request = register(.fetch(completion)) else { return completion(.failure(.unavailable)) }
        send(.fetch(request: request, room: room, before: before, limit: limit))
    }

    // MARK: link

    private func register(_ request: Pending) -> UInt32? {
        guard channel != nil else { return nil }
        nextRequest &+= 1
        pending[nextRequest] = request
        return nextRequest
    }

    private func send(_ frame: RelayFrame) {
        guard let channel else { return }
        if outgoing != nil {
            RelayCodec.append(frame, to: &outgoing!)
            return
        }
        var buffer = channel.allocator.buffer(capacity: 256)
        RelayCodec.append(frame, to: &buffer)
        outgoing = buffer
        // One write per tick, after everything this tick wanted to send.
        eventLoop.assumeIsolated().execute { [self] in
            guard let bytes = outgoing else { return }
            outgoing = nil
            self.channel?.writeAndFlush(bytes, promise: nil)
        }
    }

    private func connect() {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let client = bound.value
                    try channel.pipeline.syncOperations.addHandler(RelayLinkReader { client.received($0) })
                    try channel.pipeline.syncOperations.addHandler(RelayClientHandler(client: client))
                }
            }
            .connect(unixDomainSocketPath: socketPath)
            .assumeIsolated()
            .whenComplete { result in
                let client = bound.value
                switch result {
                case .success(let channel):
                    client.connected(channel)
                case .failure:
                    client.scheduleReconnect()
                }
            }
    }

    private func connected(_ channel: any Channel) {
        self.channel = channel
        backoff.reset()
        logger.info("relay link up", metadata: ["socket": "\(socketPath)"])
        send(.hello(worker: workerName))
        delegate?.busConnected()
    }

    fileprivate func disconnected() {
        guard channel != nil else { return }
        channel = nil
        outgoing = nil
        logger.warning("relay link lost")
        let failed = pending
        pending.removeAll()
        for request in failed.sorted(by: { $0.key < $1.key }).map(\.value) {
            switch request {
            case .join(let completion): completion(.failure(.unavailable))
            case .publish(let completion): completion(.failure(.unavailable))
            case .fetch(let completion): completion(.failure(.unavailable))
            case .rooms(let completion): completion(.failure(.unavailable))
            }
        }
        delegate?.busLost()
        scheduleReconnect()
    }

    private func scheduleReconnect() {
        eventLoop.assumeIsolated().scheduleTask(in: backoff.next()) { [self] in connect() }
    }

    fileprivate func received(_ frame: RelayFrame) {
        switch frame {
        case .message(let message):
            delegate?.bus(received: message)
        case .joined(let request, let room, let replay, let gap):
            if case .join(let completion)? = pending.removeValue(forKey: request) {
                completion(.success(JoinResult(room: room, replay: replay, gap: gap)))
            }
        case .published(let request, _, let seq, let epoch):
            if case .publish(let completion)? = pending.removeValue(forKey: request) {
                completion(.success(Published(seq: seq, epoch: epoch)))
            }
        case .fetched(let request, _, let messages, let more):
            if case .fetch(let completion)? = pending.removeValue(forKey: request) {
                completion(.success((messages, more)))
            }
        case .roomList(let request, let rooms):
            if case .rooms(let completion)? = pending.removeValue(forKey: request) {
                completion(.success(rooms))
            }
        case .hello, .join, .leave, .publish, .fetch, .info, .subscribeAll, .listRooms:
            logger.error("relay sent a worker-only frame; dropping the link")
            channel?.close(promise: nil)
        }
    }

    fileprivate func linkError(_ error: Error) {
        logger.error("relay link failed; dropping it", metadata: ["error": "\(error)"])
        channel?.close(promise: nil)
    }
}

/// The link's end and its errors (a frame that could not be read included); its frames go
/// from the `RelayLinkReader` in front straight to the client.
private final class RelayClientHandler: ChannelInboundHandler {
    typealias InboundIn = Never

    private let client: RelayBusClient

    init(client: RelayBusClient) {
        self.client = client
    }

    func channelInactive(context: ChannelHandlerContext) {
        client.disconnected()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        client.linkError(error)
    }
}
