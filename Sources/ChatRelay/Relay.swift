import ChatBus
import ChatControl
import ChatProtocol
import ChatSystem
import Logging
import NIOCore

/// The relay's state on its one event loop: the rooms and the worker links. A message is
/// encoded once and the same bytes are written to every interested link; links are
/// flushed once per loop tick, however many messages they got in it.
final class Relay {
    private var book: RoomBook
    private var links: [LinkID: ChannelHandlerContext] = [:]
    private var nextLinkID: LinkID = 0
    /// Each link's frames of this tick, written and flushed together after it.
    private var outgoing: [LinkID: ByteBuffer] = [:]
    /// Links that get every message of every room (the archiver).
    private var everything: Set<LinkID> = []
    private var flushScheduled = false
    private let logger: Logger
    private(set) var messagesIn = 0
    private(set) var messagesOut = 0
    private let journal: HistoryJournal?

    init(book: RoomBook, journal: HistoryJournal?, logger: Logger) {
        self.book = book
        self.journal = journal
        self.logger = logger
        if let journal {
            let (messages, discarded) = journal.load()
            self.book.restore(messages, nowMs: Self.nowMs())
            if discarded > 0 {
                logger.warning("ignored a torn or garbled journal tail", metadata: ["bytes": "\(discarded)"])
            }
            logger.info("history restored from journal", metadata: ["messages": "\(messages.count)", "rooms": "\(self.book.roomCount)"])
            compactJournal()
        }
    }

    var linkCount: Int { links.count }
    var roomCount: Int { book.roomCount }

    func attach(_ context: ChannelHandlerContext) -> LinkID {
        nextLinkID += 1
        links[nextLinkID] = context
        return nextLinkID
    }

    func detach(_ link: LinkID) {
        links[link] = nil
        outgoing[link] = nil
        everything.remove(link)
        book.dropLink(link)
    }

    func handle(_ frame: RelayFrame, from link: LinkID) {
        let now = Self.nowMs()
        switch frame {
        case .hello(let worker):
            logger.info("worker linked", metadata: ["worker": "\(worker)", "link": "\(link)"])
        case .join(let request, let room, let since, let epoch, let history, let members):
            let result = book.join(room: room, link: link, members: members, since: since, epoch: epoch, history: history, nowMs: now)
            send(.joined(request: request, room: result.snapshot, replay: result.replay, gap: result.gap), to: link)
        case .leave(let room, let members):
            book.leave(room: room, link: link, members: members)
        case .publish(let request, let room, let from, let text):
            messagesIn += 1
            let message = book.publish(room: room, from: from, text: text, nowMs: now)
            journal?.append(message)
            // Encoded once; each link's buffer of this tick gets a copy of the bytes.
            let bytes = RelayCodec.encode(.message(message), allocator: links[link]?.channel.allocator ?? ByteBufferAllocator())
            for interested in book.interestedLinks(in: room) ?? [:].keys where !everything.contains(interested) {
                write(bytes, to: interested)
                messagesOut += 1
            }
            for archiver in everything {
                write(bytes, to: archiver)
            }
            // After the message itself, so the sender's worker acks only once it has delivered it.
            send(.published(request: request, room: room, seq: message.seq, epoch: message.epoch), to: link)
        case .info(let request, let room):
            send(.joined(request: request, room: book.snapshot(room: room), replay: [], gap: nil), to: link)
        case .fetch(let request, let room, let before, let limit):
            let page = book.fetch(room: room, before: before, limit: limit, nowMs: now)
            send(.fetched(request: request, room: room, messages: page.messages, more: page.more), to: link)
        case .subscribeAll:
            everything.insert(link)
        case .listRooms(let request):
            send(.roomList(request: request, rooms: book.roomNames), to: link)
        case .joined, .message, .published, .fetched, .roomList:
            logger.warning("worker sent a relay-only frame; closing its link", metadata: ["link": "\(link)"])
            links[link]?.close(promise: nil)
        }
    }

    func roomStats(top: Int) -> [RoomStat] {
        book.stats(top: top, nowMs: Self.nowMs())
    }

    func sweep() {
        book.sweep(nowMs: Self.nowMs())
    }

    private func compactJournal() {
        do {
            try journal?.compact(keeping: book.heldMessages)
        } catch {
            logger.error("cannot rewrite the history journal", metadata: ["error": "\(error)"])
        }
    }

    private func send(_ frame: RelayFrame, to link: LinkID) {
        append(to: link) { RelayCodec.append(frame, to: &$0) }
    }

    private func write(_ bytes: ByteBuffer, to link: LinkID) {
        append(to: link) { $0.writeImmutableBuffer(bytes) }
    }

    /// Adds to the link's bytes of this tick; the first bytes of any link schedule the
    /// writing.
    private func append(to link: LinkID, _ add: (inout ByteBuffer) -> Void) {
        guard let context = links[link] else { return }
        if outgoing[link] != nil { return add(&outgoing[link]!) }
        var buffer = context.channel.allocator.buffer(capacity: 256)
        add(&buffer)
        outgoing[link] = buffer
        guard !flushScheduled else { return }
        flushScheduled = true
        // Runs after this tick's I/O events: one write and flush per link per tick.
        context.eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            journal?.flush()
            if journal?.needsCompaction == true { compactJournal() }
            for (link, bytes) in outgoing { links[link]?.writeAndFlush(NIOAny(bytes), promise: nil) }
            outgoing.removeAll(keepingCapacity: true)
        }
    }

    static func nowMs() -> Int { wallClockMilliseconds() }
}

/// One worker's link: its frames (from the `RelayLinkReader` in front) handed to the relay,
/// its end and its errors.
final class RelayLinkHandler: ChannelInboundHandler {
    typealias InboundIn = Never

    private let relay: Relay
    private let logger: Logger
    private var link: LinkID?

    init(relay: Relay, logger: Logger) {
        self.relay = relay
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        link = relay.attach(context)
    }

    func read(_ frame: RelayFrame) {
        guard let link else { return }
        relay.handle(frame, from: link)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let link { relay.detach(link) }
        link = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.error("worker link failed; closing it", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}
