#if canImport(Glibc)
import Glibc
#endif
import ChatArchive
import ChatBus
import ChatConfig
import ChatLink
import ChatProtocol
import ChatSystem
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Where a room's catch-up starts: after `seq` of `epoch`.
struct CatchUpPoint: Sendable, Equatable {
    var epoch: String
    var seq: Int
}

/// Messages received from the bus, waiting to be written: bounded, so a long database
/// outage costs memory up to `archive.backlog_messages`, then the oldest are dropped
/// (and fetched again from the bus's history by the next catch-up, if it still has them).
final class ArchiveBacklog: Sendable {
    private struct State {
        var messages: [RoomMessage] = []
        /// Per room, where the messages dropped since the last catch-up begin.
        var dropped: [String: CatchUpPoint] = [:]
        var received = 0
        var written = 0
        var lost = 0
        /// Messages the database refused, so that one that comes again (live and from a
        /// catch-up) is counted and logged once.
        var refused: Set<MessageKey> = []
    }

    private struct MessageKey: Hashable {
        var room: String
        var epoch: String
        var seq: Int
    }

    private let state = NIOLockedValueBox(State())
    private let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
    }

    func append(_ messages: [RoomMessage]) {
        state.withLockedValue { state in
            state.messages.append(contentsOf: messages)
            state.received += messages.count
            if state.messages.count > capacity {
                let excess = state.messages.count - capacity
                for message in state.messages.prefix(excess) {
                    state.dropped[message.room] = Self.earlier(state.dropped[message.room], message)
                }
                state.messages.removeFirst(excess)
            }
        }
    }

    func take(_ count: Int) -> [RoomMessage] {
        state.withLockedValue { state in
            let batch = Array(state.messages.prefix(count))
            state.messages.removeFirst(batch.count)
            return batch
        }
    }

    /// A batch the database refused goes back to the front.
    func putBack(_ batch: [RoomMessage]) {
        state.withLockedValue { state in
            state.messages.insert(contentsOf: batch, at: 0)
        }
    }

    func recordWritten(_ count: Int) { state.withLockedValue { $0.written += count } }
    /// Messages a catch-up fetched and wrote without holding them here.
    func recordReceived(_ count: Int) { state.withLockedValue { $0.received += count } }
    func recordLost(_ count: Int) { state.withLockedValue { $0.lost += count } }

    /// Counts a message the database refused as lost; false when it was refused before.
    func recordRefused(_ message: RoomMessage) -> Bool {
        state.withLockedValue { state in
            if state.refused.count >= 10_000 { state.refused.removeAll() }  // bounded; a repeat counts again
            guard state.refused.insert(MessageKey(room: message.room, epoch: message.epoch, seq: message.seq)).inserted else { return false }
            state.lost += 1
            return true
        }
    }

    /// Where the messages dropped from memory since the last call begin, per room (to be
    /// caught up from there).
    func takeDropped() -> [String: CatchUpPoint] {
        state.withLockedValue { state in
            defer { state.dropped = [:] }
            return state.dropped
        }
    }

    /// Drops that a failed catch-up did not fetch, back for the next one.
    func restoreDropped(_ points: [String: CatchUpPoint]) {
        state.withLockedValue { state in
            state.dropped.merge(points) { current, restored in
                current.epoch == restored.epoch && current.seq > restored.seq ? restored : current
            }
        }
    }

    /// The point before `message`, unless `point` is earlier in the same epoch (or in
    /// another epoch: the first one dropped, which is the older as the bus sends them).
    private static func earlier(_ point: CatchUpPoint?, _ message: RoomMessage) -> CatchUpPoint {
        guard let point, point.epoch != message.epoch || point.seq < message.seq else {
            return CatchUpPoint(epoch: message.epoch, seq: message.seq - 1)
        }
        return point
    }

    var stats: ChildStats {
        state.withLockedValue { state in
            var stats = ChildStats()
            stats.messagesIn = state.received
            stats.messagesOut = state.written
            stats.archiveBacklog = state.messages.count
            stats.archiveLost = state.lost
            return stats
        }
    }

    var count: Int { state.withLockedValue { $0.messages.count } }
}

/// Hears every sequenced message from the bus (on the archiver's loop).
private final class Feed: BusDelegate {
    let backlog: ArchiveBacklog
    let connected: NIOLockedValueBox<Bool>

    init(backlog: ArchiveBacklog, connected: NIOLockedValueBox<Bool>) {
        self.backlog = backlog
        self.connected = connected
    }

    var bus: (any ArchiverBus)?
    /// Called once, when the bus is first reachable and subscribed to.
    var whenFirstConnected: (() -> Void)?

    func bus(received message: RoomMessage) {
        backlog.append([message])
    }

    func busConnected() {
        bus?.subscribeAll()
        connected.withLockedValue { $0 = true }
        if let first = whenFirstConnected {
            whenFirstConnected = nil
            first()
        }
    }

    func busLost() {
        connected.withLockedValue { $0 = false }
    }
}

/// The archiver process: every message from the bus into the archive, in batches, off
/// the fan-out path; catches up from the bus's history after its own restart, a bus
/// reconnect, or a database outage; applies retention.
public enum ArchiverProcess {
    public static func run(config: GatewayConfig, logger: Logger) -> Never {
        let store: any ArchiveStore
        do {
            guard let opened = try Archive.open(config, readOnly: false) else {
                logger.critical("archive.kind is none; nothing to archive")
                exit(2)
            }
            store = opened
        } catch {
            logger.critical("cannot open the archive", metadata: ["error": "\(error)"])
            exit(1)
        }
        let runtime = ChildRuntime(logger: logger)
        let loop = runtime.eventLoop
        let backlog = ArchiveBacklog(capacity: config.archive.backlogMessages)
        let connected = NIOLockedValueBox(false)
        let stopping = NIOLockedValueBox(false)
        let bus = try! loop.submit {
            let feed = Feed(backlog: backlog, connected: connected)
            let bus = BusFactory.make(config: config, processName: "archiver", eventLoop: loop, logger: logger)
            feed.bus = bus
            bus.delegate = feed
            bus.start()
            return NIOLoopBound((bus, feed), eventLoop: loop)
        }.wait()
        let writer = Writer(store: store, backlog: backlog, bus: bus, loop: loop, connected: connected, config: config, logger: logger)
        let task = Task { await writer.run(until: stopping) }
        do {
            try runtime.connect(
                heartbeatInterval: .milliseconds(Int64(config.supervisor.heartbeatIntervalMs)),
                commands: ChildCommands(
                    stats: { backlog.stats },
                    stop: { _, _, _ in
                        stopping.withLockedValue { $0 = true }
                        Task {
                            await task.value
                            await store.close()
                            runtime.finish()
                        }
                    }
                )
            )
        } catch {
            logger.critical("archiver failed to start", metadata: ["error": "\(error)"])
            exit(1)
        }
        // Ready once subscribed to the bus (what is published before that the archive only
        // gets from the bus's history), or after a few seconds without it, as a worker.
        let ready = NIOLockedValueBox(false)
        let reportReady: @Sendable () -> Void = {
            guard !ready.withLockedValue({ let was = $0; $0 = true; return was }) else { return }
            logger.info("archiver serving", metadata: ["kind": "\(config.archive.kind.rawValue)"])
            runtime.reportReady()
        }
        loop.execute {
            let (archiverBus, feed) = bus.value
            if archiverBus.isAvailable { reportReady() } else { feed.whenFirstConnected = reportReady }
        }
        loop.scheduleTask(in: .seconds(3)) { reportReady() }
        runtime.runUntilFinished()
    }
}

/// The writing side, in Swift concurrency (the database clients are async).
private struct Writer: Sendable {
    let store: any ArchiveStore
    let backlog: ArchiveBacklog
    let bus: NIOLoopBound<(any ArchiverBus, Feed)>
    let loop: any EventLoop
    let connected: NIOLockedValueBox<Bool>
    let config: GatewayConfig
    let logger: Logger

    func run(until stopping: NIOLockedValueBox<Bool>) async {
        var databaseUp = false
        var caughtUpWhileConnected = false
        // The last write failed, whether or not the database answers (a full disk, a lock).
        var writesFailing = false
        var catchUpRetryAt = 0.0
        var lastRetention = 0.0
        // A database outage retries every second: its lines come once a minute.
        var unreachable = OutageLog()
        var writeOutage = OutageLog()
        let batchSize = config.archive.batchMessages
        let pause = UInt64(config.archive.batchMilliseconds) * 1_000_000
        while true {
            let stop = stopping.withLockedValue { $0 }
            if !databaseUp {
                do {
                    try await store.prepare()
                    databaseUp = true
                    caughtUpWhileConnected = false
                    var metadata: Logger.Metadata = [:]
                    if let lasted = unreachable.succeeded(now: monotonicSeconds()) { metadata["after_s"] = "\(Int(lasted.rounded()))" }
                    logger.info("archive database reachable", metadata: metadata)
                } catch {
                    if stop { return }
                    if let heldBack = unreachable.failed(now: monotonicSeconds()) {
                        logger.warning("archive database unreachable; messages wait in memory", metadata: [
                            "error": "\(error)", "backlog": "\(backlog.count)", "failures_not_logged": "\(heldBack)"])
                    }
                    try? await Task.sleep(nanoseconds: 1_000_000_000)
                    continue
                }
            }
            // Catch up once per bus connection (and after anything was dropped), but not
            // while writes fail: its own writes would fail too. A failed one waits a second.
            let busUp = connected.withLockedValue { $0 }
            if !busUp { caughtUpWhileConnected = false }
            if busUp && !writesFailing && !stop && monotonicSeconds() >= catchUpRetryAt {
                let dropped = backlog.takeDropped()
                if !caughtUpWhileConnected || !dropped.isEmpty {
                    caughtUpWhileConnected = await catchUp(from: dropped)
                    if !caughtUpWhileConnected { catchUpRetryAt = monotonicSeconds() + 1 }
                }
            }
            let batch = backlog.take(batchSize)
            let (unwritten, failure) = await write(batch)
            writesFailing = !unwritten.isEmpty
            if let failure, writesFailing {
                backlog.putBack(unwritten)
                if let heldBack = writeOutage.failed(now: monotonicSeconds()) {
                    logger.error("archive write failed; will retry", metadata: [
                        "error": "\(failure)", "backlog": "\(backlog.count)", "failures_not_logged": "\(heldBack)"])
                }
                // Connect again (and catch up) only when the database does not answer:
                // one that answers but takes no writes (a full disk, a lock) is waited for.
                if (try? await store.prepare()) == nil { databaseUp = false }
                try? await Task.sleep(nanoseconds: 1_000_000_000)
                continue
            }
            if !writesFailing, let lasted = writeOutage.succeeded(now: monotonicSeconds()) {
                logger.info("archive writes resumed", metadata: ["after_s": "\(Int(lasted.rounded()))", "backlog": "\(backlog.count)"])
            }
            if stop && backlog.count == 0 { return }
            let now = monotonicSeconds()
            if now - lastRetention > 60 {
                lastRetention = now
                await applyRetention()
            }
            if batch.count < batchSize {
                try? await Task.sleep(nanoseconds: pause)
            }
        }
    }

    /// Writes a batch. One whose data the database refused is written a message at a time,
    /// so that a message it cannot take (no retry would help) costs the archive that message
    /// alone, logged and counted as lost, and not every room's messages behind it. Anything
    /// else the database said (a full disk, a lock, a lost connection) costs nothing:
    /// answers the messages not written, to be tried again, and why.
    private func write(_ batch: [RoomMessage]) async -> (unwritten: [RoomMessage], failure: (any Error)?) {
        guard !batch.isEmpty else { return ([], nil) }
        do {
            try await store.insert(batch)
            backlog.recordWritten(batch.count)
            return ([], nil)
        } catch {
            guard Self.refusesTheData(error) else { return (batch, error) }
        }
        for (index, message) in batch.enumerated() {
            do {
                try await store.insert([message])
                backlog.recordWritten(1)
            } catch {
                guard Self.refusesTheData(error) else { return (Array(batch[index...]), error) }
                guard backlog.recordRefused(message) else { continue }
                logger.error("the archive refused a message; it is not archived", metadata: [
                    "room": "\(message.room)", "epoch": "\(message.epoch)", "seq": "\(message.seq)", "error": "\(error)"])
            }
        }
        return ([], nil)
    }

    private static func refusesTheData(_ error: any Error) -> Bool {
        (error as? ArchiveError)?.refusesTheData ?? false
    }

    /// Fills the archive from the bus's history: per room, everything after the newest
    /// archived message, or after the point where messages were dropped from memory. What
    /// it fetches is written at once, in batches, not through the backlog, which it could
    /// overflow again. What the history no longer holds is lost to the archive; it is
    /// logged and counted. False (the drops kept for the next one) when the bus or the
    /// database failed it.
    private func catchUp(from dropped: [String: CatchUpPoint]) async -> Bool {
        func failed() -> Bool {
            backlog.restoreDropped(dropped)
            return false
        }
        guard let tips = try? await store.tips() else { return failed() }
        let byRoom = Dictionary(tips.map { ($0.room, CatchUpPoint(epoch: $0.epoch, seq: $0.seq)) }, uniquingKeysWith: { first, _ in first })
        guard case .success(let listed) = await onLoop({ bus, done in bus.listRooms(completion: done) }) else { return failed() }
        let rooms = Set(listed).union(byRoom.keys).union(dropped.keys)
        var fetched = 0
        var missing = 0
        // Rooms' messages gathered into full batches: one transaction per room would cost
        // a many-room archive a commit per room at every start.
        var unwritten: [RoomMessage] = []
        for room in rooms {
            let from = dropped[room] ?? byRoom[room]
            let answer: Result<JoinResult, BusError> = await onLoop { bus, done in
                bus.join(room: room, since: from?.seq ?? 0, epoch: from?.epoch, history: 0, members: 0, completion: done)
            }
            guard case .success(let result) = answer else { return failed() }
            unwritten += result.replay
            if unwritten.count >= config.archive.batchMessages {
                guard await writeAll(unwritten) else { return failed() }
                unwritten.removeAll(keepingCapacity: true)
            }
            fetched += result.replay.count
            backlog.recordReceived(result.replay.count)
            if let gap = result.gap, gap.to >= gap.from, gap.from > 0 {
                missing += gap.to - gap.from + 1
                logger.warning("archive is missing messages the bus no longer holds", metadata: [
                    "room": "\(room)", "epoch": "\(gap.epoch)", "from": "\(gap.from)", "to": "\(gap.to)"])
            }
        }
        guard await writeAll(unwritten) else { return failed() }
        backlog.recordLost(missing)
        logger.info("archive caught up from the bus", metadata: ["rooms": "\(rooms.count)", "messages": "\(fetched)", "lost": "\(missing)"])
        return true
    }

    /// Writes a catch-up's messages in batches; false at the first batch not written.
    private func writeAll(_ messages: [RoomMessage]) async -> Bool {
        for start in stride(from: 0, to: messages.count, by: config.archive.batchMessages) {
            let batch = Array(messages[start..<min(start + config.archive.batchMessages, messages.count)])
            if let failure = await write(batch).failure {
                logger.error("archive write failed during a catch-up; will retry", metadata: ["error": "\(failure)"])
                return false
            }
        }
        return true
    }

    private func applyRetention() async {
        let days = config.archive.retentionDays
        let perRoom = config.archive.retentionMessages
        guard days > 0 || perRoom > 0 else { return }
        do {
            _ = try await store.applyRetention(nowMs: wallClockMilliseconds(), maxAgeMs: days * 86_400_000, maxPerRoom: perRoom)
        } catch {
            logger.warning("archive retention failed", metadata: ["error": "\(error)"])
        }
    }

    /// Runs a bus call on the archiver's loop and awaits its answer.
    private func onLoop<T: Sendable>(_ call: @escaping @Sendable (any ArchiverBus, @escaping (T) -> Void) -> Void) async -> T {
        await withCheckedContinuation { continuation in
            let bus = bus
            loop.execute {
                call(bus.value.0) { continuation.resume(returning: $0) }
            }
        }
    }
}
