import CChatEngine
import Glibc

/// One connection's record in the slab, indexed by its descriptor. A value: no object and
/// no reference count per connection. Buffers exist only while needed (a request or frame
/// split over reads; bytes the socket would not take), malloc'd and freed by the loop.
public struct Connection {
    public var state: UInt8 = Connection.free
    /// The application's: what kind of connection this is to it.
    public var kind: UInt8 = 0
    /// Was open or deciding when doomed: the application hears of its close.
    var known = false
    /// Wrote since its last `flush` (`writeOncePerFlush`); in the padding before `group`.
    var wrote = false
    /// Deciding, with its 101 held in `output` (`hold`): writes queue behind it until
    /// `release`. In the padding too.
    var holding = false
    /// The application's: where it lists the connection (say, a room and the place in its
    /// member list).
    public var group: Int32 = -1
    public var index: Int32 = -1
    var input: UnsafeMutableRawPointer? = nil
    var inputCount: Int32 = 0
    var output: UnsafeMutableRawPointer? = nil
    var outputHead: Int32 = 0
    var outputCount: Int32 = 0
    var outputCapacity: Int32 = 0

    public static let free: UInt8 = 0
    /// Accepted; its request head is not complete yet.
    public static let http: UInt8 = 1
    /// Upgraded (or a stream): what comes in goes to the application's `input`.
    public static let open: UInt8 = 2
    /// To be closed at the end of this loop turn (a descriptor is never closed, and so never
    /// reused, while the turn's event list may still name it).
    public static let doomed: UInt8 = 3
    /// Its request was taken; the application decides later (`open` or `refuse`), and what
    /// comes in meanwhile waits in its input buffer.
    public static let deciding: UInt8 = 4
    public static let listener: UInt8 = 10
}

public struct LoopConfig: Sendable {
    /// Bytes a connection may have queued (the socket would not take them) before it is
    /// dropped as a slow consumer.
    public var maxQueuedBytes = 256 * 1024
    /// Read a new connection's request right after accept (listener with TCP_DEFER_ACCEPT).
    public var readOnAccept = false
    public init() {}
}

public struct LoopCounters: Sendable {
    public var accepted = 0, handshakes = 0, refused = 0, handedOff = 0, slowConsumers = 0, closed = 0
    /// Writes the socket did not take whole (EAGAIN or short): queued for EPOLLOUT.
    public var queued = 0
}

/// What a loop serves: it decides what becomes of each request and reads what comes on
/// the connections it keeps. Every call happens on the loop's thread, inside `turn`.
public protocol LoopApplication: AnyObject {
    /// A connection's request head is complete (or refused by the upgrade parser) in
    /// `bytes`, which also hold whatever followed it. Before returning, the application
    /// answers it (`upgrade`, `refuse`), hands the descriptor on (`handOff`), or leaves it
    /// `deciding` to answer later.
    func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse)
    /// Bytes from an open connection in `p[0..<count]`, which the application may change in
    /// place (unmask, reframe); returns how many it used (whole frames or records only: the
    /// rest is kept for the next read).
    func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int
    /// `fd`, which was open or deciding, is closing: forget it. Its record still holds
    /// the application's fields.
    func closed(_ loop: Loop, fd: Int32)
    /// accept() failed for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    func acceptFailed(_ loop: Loop, listener: Int32, errno: Int32)
}

/// One epoll loop over raw descriptors, on the thread (or process) that calls `turn`.
///
/// Client sockets are registered once, edge-triggered, for IN|OUT|RDHUP: one epoll_ctl per
/// connection in its life and none when a write hits EAGAIN (a level-triggered OUT would
/// have to be added there and removed after the queue drains, two more syscalls, and would
/// fire on every turn in between). The price is reading until a short read. The listener is
/// level-triggered: a burst is accepted in batches without starving the other descriptors.
public final class Loop {
    public let config: LoopConfig
    public var counters = LoopCounters()
    public unowned(unsafe) var application: (any LoopApplication)!
    /// The epoll descriptor: readable while events wait, so another loop (NIO's) can watch
    /// this one.
    public let epfd: Int32
    public let conns: UnsafeMutablePointer<Connection>
    public let capacity: Int
    /// One scratch buffer for every read of this loop: requests and frames are parsed and
    /// reframed where they lie.
    let scratch: UnsafeMutableRawPointer
    public let scratchSize = 256 * 1024
    let events: UnsafeMutablePointer<epoll_event>
    let maxEvents: Int32 = 512
    let response: UnsafeMutableRawPointer
    /// Streams (links to other processes) whose queued output leaves at the end of a turn.
    var streams: ContiguousArray<Int32> = []
    var doomedList: ContiguousArray<Int32> = []
    var listeners: ContiguousArray<Int32> = []

    public init(config: LoopConfig = LoopConfig()) {
        self.config = config
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        capacity = Int(min(limit.rlim_cur, 1 << 20))
        conns = .allocate(capacity: capacity)
        conns.initialize(repeating: Connection(), count: capacity)
        scratch = .allocate(byteCount: scratchSize, alignment: 16)
        events = .allocate(capacity: Int(maxEvents))
        response = .allocate(byteCount: Self.responseCapacity, alignment: 16)
        epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epfd >= 0, "epoll_create1: \(errno)")
        doomedList.reserveCapacity(1024)
    }

    // MARK: descriptors

    static let IN: UInt32 = 0x001, OUT: UInt32 = 0x004, ERR: UInt32 = 0x008, HUP: UInt32 = 0x010
    static let RDHUP: UInt32 = 0x2000, ET: UInt32 = 1 << 31

    func register(_ fd: Int32, _ flags: UInt32) {
        var ev = epoll_event(events: flags, data: epoll_data_t(fd: fd))
        let r = epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev)
        precondition(r == 0, "epoll_ctl: \(errno)")
    }

    /// A listening socket (non-blocking, listen() done) this loop accepts from.
    public func addListener(_ fd: Int32) {
        conns[Int(fd)].state = Connection.listener
        listeners.append(fd)
        register(fd, Self.IN)
    }

    /// Stops accepting on `fd` (which stays open: the caller owns it). What its queue
    /// holds waits there until the caller closes it.
    public func removeListener(_ fd: Int32) {
        guard conns[Int(fd)].state == Connection.listener else { return }
        var ev = epoll_event()
        _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev)
        conns[Int(fd)] = Connection()
        listeners.removeAll { $0 == fd }
    }

    /// Accepting paused (out of files): the listeners leave epoll until `resumeAccepting`.
    public func pauseAccepting() {
        var ev = epoll_event()
        for fd in listeners { _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev) }
    }

    public func resumeAccepting() {
        for fd in listeners { register(fd, Self.IN) }
    }

    /// A byte stream to another process or loop (socketpair, Unix socket): what comes in
    /// goes to the application's `input`; `enqueue`d output leaves at the end of each turn,
    /// one write per batch.
    public func addStream(_ fd: Int32, kind: UInt8) {
        conns[Int(fd)] = Connection(state: Connection.open, kind: kind)
        streams.append(fd)
        register(fd, Self.IN | Self.OUT | Self.RDHUP | Self.ET)
    }

    // MARK: the loop

    public func run() -> Never {
        while true { turn(timeout: -1) }
    }

    /// One epoll_wait and everything it reported; then the streams' batches leave and the
    /// doomed close. Returns how many events there were.
    @discardableResult
    public func turn(timeout: Int32) -> Int {
        let n = chatengine_epoll_wait(epfd, events, maxEvents, timeout)
        if n < 0 {
            precondition(errno == EINTR, "epoll_wait: \(errno)")
            return 0
        }
        for i in 0..<Int(n) {
            let flags = events[i].events
            let fd = events[i].data.fd
            switch conns[Int(fd)].state {
            case Connection.listener:
                acceptSome(fd)
            case Connection.http, Connection.open, Connection.deciding:
                if flags & Self.OUT != 0 && conns[Int(fd)].outputCount > 0 && !conns[Int(fd)].holding { flushQueue(fd) }
                if flags & Self.IN != 0 { readable(fd) }
                if flags & (Self.ERR | Self.HUP | Self.RDHUP) != 0 { doom(fd) }
            default:
                break
            }
        }
        endTurn()
        return Int(n)
    }

    /// What a turn ends with; also for work done outside a turn (on the same thread).
    public func endTurn() {
        for fd in streams where conns[Int(fd)].outputCount > 0 { flushQueue(fd) }
        closeDoomed()
    }

    func acceptSome(_ lfd: Int32) {
        for _ in 0..<64 {
            let fd = chatengine_accept(lfd)
            if fd < 0 {
                let error = errno
                if error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM {
                    application.acceptFailed(self, listener: lfd, errno: error)
                }
                return  // EAGAIN, or out of resources: the application relieves or pauses
            }
            guard Int(fd) < capacity else { _ = chatengine_close(fd); continue }
            counters.accepted += 1
            conns[Int(fd)] = Connection(state: Connection.http)
            if config.readOnAccept { readable(fd) }
            // Edge-triggered ADD reports what is already pending, so nothing read above
            // is lost and nothing left unread is missed.
            // (Not when it was handed off, refused or failed while read above.)
            let state = conns[Int(fd)].state
            if state == Connection.http || state == Connection.open || state == Connection.deciding {
                register(fd, Self.IN | Self.OUT | Self.RDHUP | Self.ET)
            }
        }
    }

    // MARK: input

    /// Reads until a short read (edge-triggered), parsing as it goes in the scratch buffer;
    /// bytes of an incomplete request or frame are kept with the connection for next time.
    func readable(_ fd: Int32) {
        if conns[Int(fd)].state == Connection.deciding { return keepWaitingInput(fd) }
        var have = takeInput(fd)
        while true {
            let space = scratchSize - have
            let r = chatengine_read(fd, scratch + have, UInt(space))
            if r < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN { doom(fd); return }
                break
            }
            if r == 0 { doom(fd); return }
            have += r
            let used = process(fd, scratch, have)
            let state = conns[Int(fd)].state
            if state == Connection.doomed || state == Connection.free { return }
            if used < have {
                if used == 0 && have == scratchSize { doom(fd); return }  // a frame larger than the scratch buffer
                if used > 0 { memmove(scratch, scratch + used, have - used) }
            }
            have -= used
            if state == Connection.deciding {
                keep(fd, scratch, have)
                // A short read emptied the socket: nothing more to take now.
                return r < space ? () : keepWaitingInput(fd)
            }
            if r < space { break }
        }
        keep(fd, scratch, have)
    }

    /// The connection's kept input moved to the front of the scratch buffer; its length.
    func takeInput(_ fd: Int32) -> Int {
        guard let p = conns[Int(fd)].input else { return 0 }
        let have = Int(conns[Int(fd)].inputCount)
        scratch.copyMemory(from: p, byteCount: have)
        Glibc.free(p)
        conns[Int(fd)].input = nil
        conns[Int(fd)].inputCount = 0
        return have
    }

    /// Keeps `p[0..<count]` as the connection's input (appended to what it holds).
    func keep(_ fd: Int32, _ p: UnsafeRawPointer, _ count: Int) {
        guard count > 0 else { return }
        let c = conns + Int(fd)
        let old = Int(c.pointee.inputCount)
        let q = realloc(c.pointee.input, old + count)!
        (q + old).copyMemory(from: p, byteCount: count)
        c.pointee.input = q
        c.pointee.inputCount = Int32(old + count)
    }

    /// A deciding connection's bytes wait unread in its buffer, up to a request head's worth
    /// (a client does not send before its answer).
    func keepWaitingInput(_ fd: Int32) {
        while Int(conns[Int(fd)].inputCount) < UpgradeParser.maxHead {
            let r = chatengine_read(fd, scratch, UInt(UpgradeParser.maxHead))
            if r < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN { doom(fd) }
                return
            }
            if r == 0 { doom(fd); return }
            keep(fd, scratch, r)
        }
    }

    /// Parses p[0..<count] for `fd`; returns the bytes used.
    func process(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        switch conns[Int(fd)].state {
        case Connection.http:
            let parsed = UpgradeParser.parse(UnsafeRawBufferPointer(start: p, count: count))
            if case .incomplete = parsed { return 0 }
            application.request(self, fd: fd, bytes: UnsafeMutableRawBufferPointer(start: p, count: count), parse: parsed)
            switch conns[Int(fd)].state {
            case Connection.open, Connection.deciding:
                guard case .request(let request) = parsed else { return count }
                if conns[Int(fd)].state == Connection.deciding { return request.headLength }
                return request.headLength + application.input(self, fd: fd, p + request.headLength, count - request.headLength)
            default:
                return count
            }
        case Connection.open:
            return application.input(self, fd: fd, p, count)
        default:
            return count
        }
    }

    // MARK: answers

    static let responseCapacity = 1024

    static let switching: StaticString = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
    static let chatProtocol: StaticString = "\r\nSec-WebSocket-Protocol: "

    /// Answers 101 to the request in `bytes` and opens the connection: what follows the
    /// head are frames for `input`. `subprotocol`: the `Sec-WebSocket-Protocol` to confirm;
    /// `first`: frames sent in the same write as the answer. False (and the connection
    /// doomed) if the socket would not take them.
    @discardableResult
    public func upgrade(_ fd: Int32, _ request: UpgradeRequest, in bytes: UnsafeRawBufferPointer, subprotocol: StaticString? = nil,
                        followedBy first: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) -> Bool {
        let n = writeSwitchingHead(request, in: bytes, subprotocol: subprotocol)
        return sendOpening(fd, headLength: n, followedBy: first)
    }

    /// Decides now but answers later: the 101 `upgrade` would send waits in the connection's
    /// queue, the connection stays `deciding` (what the client sends waits unread), and
    /// every `write` until `release` queues behind it, so that all of it leaves in one send.
    public func hold(_ fd: Int32, _ request: UpgradeRequest, in bytes: UnsafeRawBufferPointer, subprotocol: StaticString? = nil) {
        let n = writeSwitchingHead(request, in: bytes, subprotocol: subprotocol)
        let c = conns + Int(fd)
        c.pointee.state = Connection.deciding
        c.pointee.holding = true
        if c.pointee.output == nil {
            // Room for the 101, hello and a joined or two: a small block, which malloc hands
            // out from its per-thread cache (a queue's usual 4 KiB is not).
            c.pointee.output = malloc(Self.heldCapacity)!
            c.pointee.outputCapacity = Int32(Self.heldCapacity)
        }
        enqueue(fd, response, n, limit: config.maxQueuedBytes)
    }

    static let heldCapacity = 512

    /// Whether `fd`'s 101 is held (`hold`) and not released yet.
    @inline(__always)
    public func isHolding(_ fd: Int32) -> Bool {
        conns[Int(fd)].holding && conns[Int(fd)].state == Connection.deciding
    }

    /// Sends a held 101 with everything queued behind it and opens the connection (then
    /// `resumeInput`, if input was kept); what the socket does not take now leaves on
    /// EPOLLOUT. False if the send failed (the connection is doomed).
    @discardableResult
    public func release(_ fd: Int32) -> Bool {
        guard isHolding(fd) else { return false }
        let c = conns + Int(fd)
        c.pointee.holding = false
        c.pointee.wrote = false
        c.pointee.state = Connection.open
        counters.handshakes += 1
        flushQueue(fd)
        if c.pointee.outputCount > 0 { counters.queued += 1 }
        return c.pointee.state == Connection.open
    }

    /// The 101 for `request` into `response`; its length.
    private func writeSwitchingHead(_ request: UpgradeRequest, in bytes: UnsafeRawBufferPointer, subprotocol: StaticString?) -> Int {
        let head = Self.switching
        var n = head.utf8CodeUnitCount
        response.copyMemory(from: head.utf8Start, byteCount: n)
        n += WebSocketAccept.write(key: UnsafeRawBufferPointer(rebasing: bytes[request.key]), to: response + n)
        if let subprotocol {
            (response + n).copyMemory(from: Self.chatProtocol.utf8Start, byteCount: Self.chatProtocol.utf8CodeUnitCount)
            n += Self.chatProtocol.utf8CodeUnitCount
            (response + n).copyMemory(from: subprotocol.utf8Start, byteCount: subprotocol.utf8CodeUnitCount)
            n += subprotocol.utf8CodeUnitCount
        }
        response.storeBytes(of: 0x0A0D_0A0D, toByteOffset: n, as: UInt32.self)  // "\r\n\r\n"
        return n + 4
    }

    /// Sends the head in `response` and `first` in one write; the connection is open.
    private func sendOpening(_ fd: Int32, headLength: Int, followedBy first: UnsafeRawBufferPointer) -> Bool {
        var n = headLength
        var out = response
        if first.count > 0 {
            if n + first.count <= Self.responseCapacity {
                (response + n).copyMemory(from: first.baseAddress!, byteCount: first.count)
            } else {
                out = malloc(n + first.count)!
                out.copyMemory(from: response, byteCount: n)
                (out + n).copyMemory(from: first.baseAddress!, byteCount: first.count)
            }
            n += first.count
        }
        defer { if out != response { Glibc.free(out) } }
        let sent = chatengine_send(fd, out, UInt(n))
        guard sent >= headLength else { doom(fd); return false }  // a fresh socket takes a few hundred bytes
        counters.handshakes += 1
        conns[Int(fd)].state = Connection.open
        if sent < n {
            // Frames beyond what a fresh socket takes (a long replay): queued, sent on EPOLLOUT.
            counters.queued += 1
            enqueue(fd, out + sent, n - sent, limit: config.maxQueuedBytes)
        }
        return conns[Int(fd)].state == Connection.open
    }

    /// Leaves the request unanswered for now: the application answers later, outside the
    /// request call, with `upgrade` (then `resumeInput`) or `refuse`.
    public func decideLater(_ fd: Int32) {
        conns[Int(fd)].state = Connection.deciding
    }

    /// After a deferred `upgrade`: what came meanwhile goes to `input` now (no readiness
    /// event would bring it: the socket is edge-triggered and was read).
    public func resumeInput(_ fd: Int32) {
        guard conns[Int(fd)].state == Connection.open, let p = conns[Int(fd)].input else { return }
        let count = Int(conns[Int(fd)].inputCount)
        conns[Int(fd)].input = nil
        conns[Int(fd)].inputCount = 0
        let used = application.input(self, fd: fd, p, count)
        if conns[Int(fd)].state == Connection.open && used < count { keep(fd, p + used, count - used) }
        Glibc.free(p)
        // Every readiness edge while deciding was read to EAGAIN (`keepWaitingInput`) unless
        // it stopped at a head's worth: only then can the socket hold more.
        if conns[Int(fd)].state == Connection.open && count >= UpgradeParser.maxHead { readable(fd) }
    }

    /// What a deciding connection sent after its request head, unread so far (valid until
    /// the next call on the loop).
    public func keptInput(_ fd: Int32) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: conns[Int(fd)].input, count: Int(conns[Int(fd)].inputCount))
    }

    /// Answers `response` (a whole HTTP answer) and closes.
    public func refuse(_ fd: Int32, _ response: UnsafeRawBufferPointer) {
        counters.refused += 1
        _ = chatengine_send(fd, response.baseAddress, UInt(response.count))
        doom(fd)
    }

    public func refuse(_ fd: Int32, _ response: StaticString) {
        refuse(fd, UnsafeRawBufferPointer(start: response.utf8Start, count: response.utf8CodeUnitCount))
    }

    /// Gives the descriptor up to another owner (which closes it): out of epoll and out of
    /// the slab, without closing. The bytes read so far are the caller's to pass on.
    public func handOff(_ fd: Int32) {
        var ev = epoll_event()
        _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev)
        let c = conns + Int(fd)
        Glibc.free(c.pointee.input)
        Glibc.free(c.pointee.output)
        c.pointee = Connection()
        counters.handedOff += 1
    }

    // MARK: output

    /// Writes straight to the socket; what it does not take is queued (and sent on EPOLLOUT).
    @inline(__always)
    public func write(_ fd: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        let c = conns + Int(fd)
        if c.pointee.state != Connection.open {
            if isHolding(fd) { enqueue(fd, bytes, length, limit: config.maxQueuedBytes) }
            return
        }
        if c.pointee.outputCount > 0 {
            enqueue(fd, bytes, length, limit: config.maxQueuedBytes)
            return
        }
        let r = chatengine_send(fd, bytes, UInt(length))
        if r == length { return }
        counters.queued += 1
        if r < 0 {
            if errno == EAGAIN { enqueue(fd, bytes, length, limit: config.maxQueuedBytes) } else { doom(fd) }
            return
        }
        enqueue(fd, bytes + r, length - r, limit: config.maxQueuedBytes)
    }

    /// `write` for the first write since the connection's last `flush`; later ones are
    /// queued for that `flush` to send in one go (k frames in one tick: two sends, not k).
    @inline(__always)
    public func writeOncePerFlush(_ fd: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        let c = conns + Int(fd)
        guard c.pointee.wrote else {
            c.pointee.wrote = true
            return write(fd, bytes, length)
        }
        if c.pointee.state == Connection.open || isHolding(fd) { enqueue(fd, bytes, length, limit: config.maxQueuedBytes) }
    }

    /// Sends what the connection has queued, as much as the socket takes.
    @inline(__always)
    public func flush(_ fd: Int32) {
        let c = conns + Int(fd)
        c.pointee.wrote = false
        guard c.pointee.outputCount > 0, c.pointee.state == Connection.open else { return }
        flushQueue(fd)
    }

    /// Bytes the connection has waiting for its socket.
    @inline(__always)
    public func queuedBytes(_ fd: Int32) -> Int { Int(conns[Int(fd)].outputCount) }

    /// Appends to the connection's queue without writing (a stream's batch, sent at the end
    /// of the turn); past `limit` the connection is dropped as a slow consumer.
    public func enqueue(_ fd: Int32, _ bytes: UnsafeRawPointer, _ length: Int, limit: Int) {
        let c = conns + Int(fd)
        var head = Int(c.pointee.outputHead), count = Int(c.pointee.outputCount), cap = Int(c.pointee.outputCapacity)
        if count + length > limit {
            counters.slowConsumers += 1
            doom(fd)
            return
        }
        if head + count + length > cap {
            if count + length <= cap && head > 0 {
                memmove(c.pointee.output!, c.pointee.output! + head, count)
            } else {
                cap = max(cap * 2, count + length, 4096)
                let p = malloc(cap)!
                if count > 0 { p.copyMemory(from: c.pointee.output! + head, byteCount: count) }
                Glibc.free(c.pointee.output)
                c.pointee.output = p
            }
            head = 0
        }
        (c.pointee.output! + head + count).copyMemory(from: bytes, byteCount: length)
        c.pointee.outputHead = Int32(head)
        c.pointee.outputCount = Int32(count + length)
        c.pointee.outputCapacity = Int32(cap)
    }

    func flushQueue(_ fd: Int32) {
        let c = conns + Int(fd)
        while c.pointee.outputCount > 0 {
            let r = chatengine_send(fd, c.pointee.output! + Int(c.pointee.outputHead), UInt(c.pointee.outputCount))
            if r < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN { doom(fd) }
                return
            }
            c.pointee.outputHead += Int32(r)
            c.pointee.outputCount -= Int32(r)
        }
        Glibc.free(c.pointee.output)
        c.pointee.output = nil
        c.pointee.outputHead = 0
        c.pointee.outputCapacity = 0
    }

    // MARK: closing

    /// Writes a close frame with `code` (queued behind what is waiting, like any write).
    public func sendClose(_ fd: Int32, _ code: UInt16) {
        var frame: (UInt8, UInt8, UInt8, UInt8) = (0x88, 2, UInt8(code >> 8), UInt8(code & 0xFF))
        withUnsafeBytes(of: &frame) { write(fd, $0.baseAddress!, 4) }
    }

    /// Sends a close frame with `code` and drops the connection at the end of the turn.
    public func closeWith(_ fd: Int32, _ code: UInt16) {
        sendClose(fd, code)
        // What the socket would not take now is lost with the close.
        if conns[Int(fd)].outputCount > 0 { flushQueue(fd) }
        doom(fd)
    }

    /// Closes `fd` at the end of the turn (the application hears of it then, so that a
    /// fan-out never sees its member list change under it).
    public func doom(_ fd: Int32) {
        let c = conns + Int(fd)
        let state = c.pointee.state
        guard state == Connection.http || state == Connection.open || state == Connection.deciding else { return }
        c.pointee.known = state != Connection.http
        c.pointee.state = Connection.doomed
        doomedList.append(fd)
    }

    func closeDoomed() {
        guard !doomedList.isEmpty else { return }
        for fd in doomedList where conns[Int(fd)].known {
            application.closed(self, fd: fd)
        }
        for fd in doomedList {
            let c = conns + Int(fd)
            Glibc.free(c.pointee.input)
            Glibc.free(c.pointee.output)
            c.pointee = Connection()
            _ = chatengine_close(fd)
            counters.closed += 1
        }
        doomedList.removeAll(keepingCapacity: true)
        streams.removeAll { conns[Int($0)].state != Connection.open }
    }
}
