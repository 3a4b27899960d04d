import ChatConfig
import ChatProtocol
import Logging
import NIOCore
import NIOPosix

private func b(_ text: String) -> [UInt8] { Array(text.utf8) }

/// The worker's side of the Redis bus: one pipelined command connection and one
/// subscriber connection, both on the worker's event loop, reconnecting with backoff.
///
/// Publish and history append are one Lua step; live delivery comes over SUBSCRIBE for
/// rooms with local members. Answers (command connection) and live messages (subscriber
/// connection) travel separately, so this client puts them back in one order, the order
/// the `Bus` protocol promises (and the relay gives by itself, on one link):
/// - while a join of a room is being answered, that room's live messages are held;
/// - a join's answer reaches the worker at its place in the room's live stream: when
///   this worker was already receiving the room, only once every message up to the
///   answer's seq has been delivered (`waitingAnswers`); when it starts receiving the
///   room with this join, at once, and the messages up to that seq are then dropped
///   (they are in the answer's replay, or before the new member's time);
/// - a publish is answered only once its own message has been delivered, so the sender
///   sees its `ack` after its `message`;
/// - per room, messages are delivered once each, in seq order (`epoch`, `lastSeq`).
public final class RedisBusClient: ArchiverBus {
    public struct Settings: Sendable {
        public var endpoint: RedisEndpoint
        public var historyMessages: Int
        public var historyMaxAgeMs: Int
        public var workerID: String

        public init(endpoint: RedisEndpoint, historyMessages: Int, historyMaxAgeMs: Int, workerID: String) {
            self.endpoint = endpoint
            self.historyMessages = historyMessages
            self.historyMaxAgeMs = historyMaxAgeMs
            self.workerID = workerID
        }
    }

    private struct Room {
        var members = 0
        var subscribed = false
        var subscribing = false
        var afterSubscribe: [() -> Void] = []
        var joinsInFlight = 0
        var held: [RoomMessage] = []
        /// What this worker has delivered of the room ("" before its first answered join).
        var epoch = ""
        var lastSeq = 0
        var pendingAcks: [(seq: Int, epoch: String, complete: () -> Void)] = []
        /// Join answers waiting for the live stream to reach their seq.
        var waitingAnswers: [(seq: Int, epoch: String, answer: () -> Void)] = []

        var isDelivering: Bool { !epoch.isEmpty }
    }

    public weak var delegate: BusDelegate?
    private let settings: Settings
    private let eventLoop: any EventLoop
    private let logger: Logger
    private var commands: RedisConnection?
    private var subscriber: RedisConnection?
    private var scripts: (publish: String, join: String)?
    private var rooms: [String: Room] = [:]
    private var backoff = ReconnectBackoff()
    private var connecting = false
    private var aliveTask: RepeatedTask?
    /// Archiver mode: every room's messages (PSUBSCRIBE), no per-room bookkeeping.
    private var allRooms = false

    /// Room keys outlive their history by a day, then an idle room is forgotten.
    private var keyLifetime: Int { settings.historyMaxAgeMs / 1000 + 86_400 }
    private static let aliveSeconds = 15

    public init(settings: Settings, eventLoop: any EventLoop, logger: Logger) {
        self.settings = settings
        self.eventLoop = eventLoop
        self.logger = logger
    }

    public var isAvailable: Bool { commands != nil && subscriber != nil && scripts != nil }

    public func start() {
        connect()
    }


    // MARK: Bus

    public func join(room: String, since: Int?, epoch: String?, history: Int, members: Int,
                     completion: @escaping (Result<JoinResult, BusError>) -> Void) {
        guard isAvailable else { return completion(.failure(.unavailable)) }
        if allRooms {
            return runJoin(room: room, delta: 0) { result in
                completion(result.map { state in
                    let (replay, gap) = HistoryRules.replay(held: state.held, epoch: state.snapshot.epoch, seq: state.snapshot.seq,
                                                            since: since, epoch: epoch, history: history)
                    return JoinResult(room: state.snapshot, replay: replay, gap: gap)
                })
            }
        }
        rooms[room, default: Room()].members += members
        rooms[room]?.joinsInFlight += 1
        whenSubscribed(room) { [self] in
            runJoin(room: room, delta: members) { [self] result in
                answerInPlace(room, result.map { state in
                    let (replay, gap) = HistoryRules.replay(held: state.held, epoch: state.snapshot.epoch, seq: state.snapshot.seq,
                                                            since: since, epoch: epoch, history: history)
                    return JoinResult(room: state.snapshot, replay: replay, gap: gap)
                }, completion)
                joinAnswered(room)
            }
        }
    }

    public func leave(room: String, members: Int) {
        guard var state = rooms[room] else { return }
        state.members -= members
        rooms[room] = state
        commands?.send([b("HINCRBY"), key(room, "members"), b(settings.workerID), b(String(-members))]) { _ in }
        unsubscribeIfUnused(room)
    }

    public func publish(room: String, from: String, text: String, completion: @escaping (Result<Published, BusError>) -> Void) {
        guard let commands, let scripts else { return completion(.failure(.unavailable)) }
        let arguments = [key(room, "seq"), key(room, "epoch"), key(room, "stream"), channel(room),
                         b(from), b(text), b(String(settings.historyMessages)), b(String(settings.historyMaxAgeMs)),
                         b(Self.newEpoch()), b(String(keyLifetime))]
        evalsha(commands, sha: scripts.publish, source: RedisScripts.publish, keys: 4, arguments: arguments) { [self] reply in
            guard let parts = reply.array, parts.count == 3, let seq = parts[0].integer, let epoch = parts[1].text else {
                logUnexpected(reply, during: "publish")
                return completion(.failure(.unavailable))
            }
            let published = Published(seq: seq, epoch: epoch)
            // Answer once this worker has delivered the message itself (if it gets it): live,
            // or, while the room's subscription is still being set up (a re-join after a
            // reconnect), in the join's replay (`answered`).
            guard var state = rooms[room], state.subscribed || state.subscribing, !(state.epoch == epoch && state.lastSeq >= seq) else {
                return completion(.success(published))
            }
            state.pendingAcks.append((seq, epoch, { completion(.success(published)) }))
            rooms[room] = state
        }
    }

    public func info(room: String, completion: @escaping (Result<RoomSnapshot, BusError>) -> Void) {
        guard isAvailable else { return completion(.failure(.unavailable)) }
        runJoin(room: room, delta: 0) { completion($0.map(\.snapshot)) }
    }

    public func subscribeAll() {
        allRooms = true
        subscriber?.sendForPush([b("PSUBSCRIBE"), b(Self.channelPrefix + "*")])
    }

    public func listRooms(completion: @escaping (Result<[String], BusError>) -> Void) {
        guard let commands else { return completion(.failure(.unavailable)) }
        scan(commands, cursor: "0", found: [], completion: completion)
    }

    /// SCAN for `chatgw:{ROOM}:seq` keys, cursor by cursor.
    private func scan(_ connection: RedisConnection, cursor: String, found: [String], completion: @escaping (Result<[String], BusError>) -> Void) {
        connection.send([b("SCAN"), b(cursor), b("MATCH"), b("chatgw:{*}:seq"), b("COUNT"), b("1000")]) { [self] reply in
            guard let parts = reply.array, parts.count == 2, let next = parts[0].text, let keys = parts[1].array else {
                logUnexpected(reply, during: "SCAN")
                return completion(.failure(.unavailable))
            }
            let rooms = found + keys.compactMap { key -> String? in
                guard let text = key.text, text.hasPrefix("chatgw:{"), text.hasSuffix("}:seq") else { return nil }
                return String(text.dropFirst("chatgw:{".count).dropLast("}:seq".count))
            }
            if next == "0" { completion(.success(rooms)) } else { scan(connection, cursor: next, found: rooms, completion: completion) }
        }
    }

    public func fetch(room: String, before: HistoryPosition?, limit: Int,
                      completion: @escaping (Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void) {
        guard isAvailable else { return completion(.failure(.unavailable)) }
        runJoin(room: room, delta: 0) { result in
            completion(result.map { state in HistoryRules.page(held: state.held, epoch: state.snapshot.epoch, before: before, limit: limit) })
        }
    }

    // MARK: joining

    private struct RoomState {
        var snapshot: RoomSnapshot
        /// Held history, oldest first.
        var held: [RoomMessage]
    }

    private func runJoin(room: String, delta: Int, completion: @escaping (Result<RoomState, BusError>) -> Void) {
        guard let commands, let scripts else { return completion(.failure(.unavailable)) }
        let arguments = [key(room, "seq"), key(room, "epoch"), key(room, "stream"), key(room, "members"),
                         b(Self.newEpoch()), b(settings.workerID), b(String(delta)), b(String(settings.historyMessages)),
                         b(String(keyLifetime)), b(String(settings.historyMaxAgeMs))]
        evalsha(commands, sha: scripts.join, source: RedisScripts.join, keys: 4, arguments: arguments) { [self] reply in
            guard let parts = reply.array, parts.count == 4, let epoch = parts[0].text, let seq = parts[1].integer,
                  let members = parts[2].integer, let entries = parts[3].array else {
                logUnexpected(reply, during: "join")
                return completion(.failure(.unavailable))
            }
            let held = entries.reversed().compactMap { Self.message(fromEntry: $0, room: room) }
            completion(.success(RoomState(snapshot: RoomSnapshot(name: room, epoch: epoch, seq: seq, members: members), held: held)))
        }
    }

    /// Hands a join's answer to the worker at its place in the room's live stream (see the
    /// type's comment).
    private func answerInPlace(_ room: String, _ result: Result<JoinResult, BusError>,
                               _ completion: @escaping (Result<JoinResult, BusError>) -> Void) {
        guard case .success(let answer) = result, var state = rooms[room] else { return completion(result) }
        let snapshot = answer.room
        guard state.isDelivering else {
            state.epoch = snapshot.epoch
            state.lastSeq = snapshot.seq
            rooms[room] = state
            completion(result)
            // The worker starts the room with this answer's replay (a re-join after a
            // reconnect): publishes it covers were delivered that way, so their answers go.
            return answered(room, upTo: snapshot)
        }
        if state.epoch == snapshot.epoch && state.lastSeq >= snapshot.seq { return completion(result) }
        state.waitingAnswers.append((snapshot.seq, snapshot.epoch, { completion(result) }))
        rooms[room] = state
        // The subscription was live all along, so the messages will come; should one be
        // lost on the way, the join is answered anyway rather than never.
        eventLoop.assumeIsolated().scheduleTask(in: Self.answerWait) { [self] in
            guard var state = rooms[room] else { return }
            let overdue = state.waitingAnswers.filter { $0.seq == snapshot.seq && $0.epoch == snapshot.epoch }
            state.waitingAnswers.removeAll { $0.seq == snapshot.seq && $0.epoch == snapshot.epoch }
            rooms[room] = state
            if !overdue.isEmpty { logger.warning("a join answer waited for live messages that did not come", metadata: ["room": "\(room)"]) }
            for waiting in overdue { waiting.answer() }
        }
    }

    /// Longest a join answer waits for the live stream to reach it.
    private static let answerWait = TimeAmount.seconds(2)

    private func joinAnswered(_ room: String) {
        guard var state = rooms[room] else { return }
        state.joinsInFlight -= 1
        guard state.joinsInFlight == 0 else {
            rooms[room] = state
            return
        }
        let held = state.held
        state.held = []
        rooms[room] = state
        for message in held { deliver(message) }
        unsubscribeIfUnused(room)
    }

    /// A join that starts the room was answered and its replay handed to the worker: the
    /// publishes it covers were delivered that way, so their answers may go. (When the
    /// worker was already receiving the room, `deliver` answers them as their messages come.)
    private func answered(_ room: String, upTo snapshot: RoomSnapshot) {
        guard var state = rooms[room], !state.pendingAcks.isEmpty else { return }
        let covered: ((seq: Int, epoch: String, complete: () -> Void)) -> Bool = { $0.epoch == snapshot.epoch && $0.seq <= snapshot.seq }
        let due = state.pendingAcks.filter(covered)
        state.pendingAcks.removeAll(where: covered)
        rooms[room] = state
        for ack in due { ack.complete() }
    }

    private func whenSubscribed(_ room: String, then action: @escaping () -> Void) {
        guard var state = rooms[room], let subscriber else { return action() }
        if state.subscribed { return action() }
        state.afterSubscribe.append(action)
        if !state.subscribing {
            state.subscribing = true
            subscriber.sendForPush([b("SUBSCRIBE"), channel(room)])
            // A server that never confirms is not Redis (or is stuck): start over.
            eventLoop.assumeIsolated().scheduleTask(in: .seconds(2)) { [self, weak subscriber] in
                guard let subscriber, subscriber === self.subscriber, rooms[room]?.subscribing == true else { return }
                logger.error("Redis did not confirm a SUBSCRIBE; reconnecting", metadata: ["room": "\(room)"])
                disconnected()
            }
        }
        rooms[room] = state
    }

    private func unsubscribeIfUnused(_ room: String) {
        guard let state = rooms[room], state.members <= 0, state.joinsInFlight == 0 else { return }
        if state.subscribed || state.subscribing {
            subscriber?.sendForPush([b("UNSUBSCRIBE"), channel(room)])
        }
        for ack in state.pendingAcks { ack.complete() }
        for waiting in state.waitingAnswers { waiting.answer() }
        rooms[room] = nil
    }

    // MARK: live messages

    private func received(push: RedisValue) {
        if allRooms, let parts = push.array, parts.count == 4, parts[0].text == "pmessage", let channelName = parts[2].text,
           channelName.hasPrefix(Self.channelPrefix), case .string(let payload) = parts[3] {
            let room = String(channelName.dropFirst(Self.channelPrefix.count))
            if let message = Self.message(fromPayload: payload, room: room) { delegate?.bus(received: message) }
            return
        }
        guard let parts = push.array, parts.count >= 3, let kind = parts[0].text, let channelName = parts[1].text,
              channelName.hasPrefix(Self.channelPrefix) else { return }
        let room = String(channelName.dropFirst(Self.channelPrefix.count))
        switch kind {
        case "subscribe":
            guard var state = rooms[room] else { return }
            state.subscribed = true
            state.subscribing = false
            let actions = state.afterSubscribe
            state.afterSubscribe = []
            rooms[room] = state
            actions.forEach { $0() }
        case "message":
            guard case .string(let payload) = parts[2], let message = Self.message(fromPayload: payload, room: room) else {
                return logger.warning("unreadable message on a Redis channel", metadata: ["channel": "\(channelName)"])
            }
            if var state = rooms[room], state.joinsInFlight > 0 {
                state.held.append(message)
                rooms[room] = state
            } else {
                deliver(message)
            }
        default:
            break
        }
    }

    private func deliver(_ message: RoomMessage) {
        guard var state = rooms[message.room] else { return }
        if state.epoch == message.epoch && message.seq <= state.lastSeq { return }
        state.epoch = message.epoch
        state.lastSeq = message.seq
        let due = state.pendingAcks.filter { $0.epoch != message.epoch || $0.seq <= message.seq }
        state.pendingAcks.removeAll { $0.epoch != message.epoch || $0.seq <= message.seq }
        let reached = state.waitingAnswers.filter { $0.epoch == message.epoch && $0.seq <= message.seq }
        state.waitingAnswers.removeAll { $0.epoch == message.epoch && $0.seq <= message.seq }
        rooms[message.room] = state
        delegate?.bus(received: message)
        // After the message: the new members' replay ends with it.
        for waiting in reached { waiting.answer() }
        for ack in due { ack.complete() }
    }

    // MARK: connections

    private func connect() {
        guard !connecting else { return }
        connecting = true
        let endpoint = settings.endpoint
        let loop = eventLoop
        let failed: (Error) -> Void = { [self] error in
            connecting = false
            logger.debug("Redis unreachable", metadata: ["error": "\(error)"])
            scheduleReconnect()
        }
        RedisConnection.connect(to: endpoint, on: loop).assumeIsolated().whenComplete { [self] first in
            switch first {
            case .failure(let error): failed(error)
            case .success(let commands):
                let commands = commands.value
                RedisConnection.connect(to: endpoint, on: loop).assumeIsolated().whenComplete { [self] second in
                    switch second {
                    case .failure(let error):
                        commands.close()
                        failed(error)
                    case .success(let subscriber):
                        prepare(commands: commands, subscriber: subscriber.value)
                    }
                }
            }
        }
    }

    /// AUTH and SELECT, load the scripts, mark this worker alive, then go live.
    private func prepare(commands: RedisConnection, subscriber: RedisConnection) {
        let setup: [[[UInt8]]] = (settings.endpoint.password.map { [[b("AUTH"), b($0)]] } ?? [])
        for command in setup {
            commands.send(command) { _ in }
            subscriber.send(command) { _ in }
        }
        commands.send([b("SELECT"), b(String(settings.endpoint.database))]) { _ in }
        commands.send([b("SCRIPT"), b("LOAD"), b(RedisScripts.join)]) { [self] joinSHA in
            commands.send([b("SCRIPT"), b("LOAD"), b(RedisScripts.publish)]) { [self] publishSHA in
                guard let publish = Self.scriptHash(publishSHA), let join = Self.scriptHash(joinSHA) else {
                    logUnexpected(publishSHA, during: "SCRIPT LOAD")
                    commands.close()
                    subscriber.close()
                    connecting = false
                    scheduleReconnect()
                    return
                }
                connected(commands: commands, subscriber: subscriber, scripts: (publish, join))
            }
        }
    }

    private func connected(commands: RedisConnection, subscriber: RedisConnection, scripts: (publish: String, join: String)) {
        connecting = false
        let lost: () -> Void = { [weak self] in self?.disconnected() }
        commands.onClose = lost
        subscriber.onClose = lost
        subscriber.onPush = { [weak self] push in self?.received(push: push) }
        self.commands = commands
        self.subscriber = subscriber
        self.scripts = scripts
        backoff.reset()
        refreshAlive()
        aliveTask?.cancel()
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        aliveTask = eventLoop.scheduleRepeatedTask(initialDelay: .seconds(5), delay: .seconds(5)) { _ in
            bound.value.refreshAlive()
        }
        // Our old counts (if Redis kept them) are replaced by the worker's re-joins.
        for room in rooms.keys {
            commands.send([b("HDEL"), key(room, "members"), b(settings.workerID)]) { _ in }
        }
        rooms.removeAll()
        logger.info("Redis bus up", metadata: ["endpoint": "\(settings.endpoint.address)"])
        delegate?.busConnected()
    }

    private func disconnected() {
        guard let oldCommands = commands, let oldSubscriber = subscriber else { return }
        // Forget the pair before closing it: closing fires onClose, which must find
        // nothing left to tear down (else two reconnect loops start).
        commands = nil
        subscriber = nil
        scripts = nil
        oldCommands.onClose = nil
        oldSubscriber.onClose = nil
        oldCommands.close()
        oldSubscriber.close()
        aliveTask?.cancel()
        aliveTask = nil
        logger.warning("Redis bus lost; reconnecting")
        for (name, state) in rooms {
            for ack in state.pendingAcks { ack.complete() }
            rooms[name]?.pendingAcks = []
            // Answered joins waiting for the live stream: the worker re-joins the room on
            // reconnect and brings its members up to date then.
            for waiting in state.waitingAnswers { waiting.answer() }
            rooms[name]?.waitingAnswers = []
            // Joins waiting for a SUBSCRIBE confirmation: run them now; with no
            // connection they answer `unavailable`.
            rooms[name]?.afterSubscribe = []
            rooms[name]?.subscribing = false
            rooms[name]?.subscribed = false
            state.afterSubscribe.forEach { $0() }
        }
        delegate?.busLost()
        scheduleReconnect()
    }

    private func scheduleReconnect() {
        eventLoop.assumeIsolated().scheduleTask(in: backoff.next()) { [self] in connect() }
    }

    private func refreshAlive() {
        commands?.send([b("SET"), b("chatgw:alive:" + settings.workerID), b("1"), b("EX"), b(String(Self.aliveSeconds))]) { _ in }
    }

    /// EVALSHA, loading the script again if Redis forgot it (SCRIPT FLUSH, a restart).
    private func evalsha(_ connection: RedisConnection, sha: String, source: String, keys: Int, arguments: [[UInt8]],
                         reply: @escaping (RedisValue) -> Void) {
        connection.send([b("EVALSHA"), b(sha), b(String(keys))] + arguments) { answer in
            if case .error(let message) = answer, message.hasPrefix("NOSCRIPT") {
                connection.send([b("EVAL"), b(source), b(String(keys))] + arguments, reply: reply)
            } else {
                reply(answer)
            }
        }
    }

    /// A SCRIPT LOAD answer: 40 hex digits, or nil.
    private static func scriptHash(_ reply: RedisValue) -> String? {
        guard case .string = reply, let text = reply.text, text.count == 40, text.allSatisfy(\.isHexDigit) else { return nil }
        return text
    }

    private func logUnexpected(_ reply: RedisValue, during step: String) {
        logger.error("unexpected answer from Redis", metadata: ["step": "\(step)", "answer": "\(String(describing: reply).prefix(200))"])
    }

    // MARK: encoding

    static let channelPrefix = "chatgw:"

    private func key(_ room: String, _ suffix: String) -> [UInt8] { b("chatgw:{\(room)}:\(suffix)") }
    private func channel(_ room: String) -> [UInt8] { b(Self.channelPrefix + room) }

    static func newEpoch() -> String {
        Epoch.random()
    }

    /// "seq\nepoch\nts\nfrom\ntext" (the text may hold newlines; it comes last).
    static func message(fromPayload payload: [UInt8], room: String) -> RoomMessage? {
        let parts = payload.split(separator: UInt8(ascii: "\n"), maxSplits: 4, omittingEmptySubsequences: false)
        guard parts.count == 5, let seq = Int(String(decoding: parts[0], as: UTF8.self)),
              let ts = Int(String(decoding: parts[2], as: UTF8.self)) else { return nil }
        return RoomMessage(room: room, seq: seq, epoch: String(decoding: parts[1], as: UTF8.self),
                           from: String(decoding: parts[3], as: UTF8.self), text: String(decoding: parts[4], as: UTF8.self), ts: ts)
    }

    /// A stream entry: [id, [field, value, ...]].
    static func message(fromEntry entry: RedisValue, room: String) -> RoomMessage? {
        guard let parts = entry.array, parts.count == 2, let fields = parts[1].array else { return nil }
        var values: [String: String] = [:]
        var index = 0
        while index + 1 < fields.count {
            if let name = fields[index].text, let value = fields[index + 1].text { values[name] = value }
            index += 2
        }
        guard let seq = values["s"].flatMap({ Int($0) }), let epoch = values["e"], let from = values["f"], let text = values["t"],
              let ts = values["ts"].flatMap({ Int($0) }) else { return nil }
        return RoomMessage(room: room, seq: seq, epoch: epoch, from: from, text: text, ts: ts)
    }
}
