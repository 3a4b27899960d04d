import CChatEngine
import Glibc

/// One connection's record in the slab, indexed by its descriptor. A value: no object and
/// no reference count per connection. Buffers exist only while needed (a request or frame
/// split over reads; bytes the socket would not take), malloc'd and freed by the loop.
public struct Connection {
    public var state: UInt8 = Connection.free
    public var role: UInt8 = 0
    public var room: Int32 = -1
    /// Index in the room's member list (subscribers), or in `peers` (peer links).
    public var slot: Int32 = -1
    var input: UnsafeMutableRawPointer? = nil
    var inputCount: Int32 = 0
    var output: UnsafeMutableRawPointer? = nil
    var outputHead: Int32 = 0
    var outputCount: Int32 = 0
    var outputCapacity: Int32 = 0

    public static let free: UInt8 = 0
    public static let http: UInt8 = 1
    public static let open: UInt8 = 2
    /// To be closed at the end of this loop turn (a descriptor is never closed, and so never
    /// reused, while the turn's event list may still name it).
    public static let doomed: UInt8 = 3
    public static let listener: UInt8 = 10
    public static let peer: UInt8 = 11

    public static let subscriber: UInt8 = 0
    public static let publisher: UInt8 = 1
}

public struct LoopConfig: Sendable {
    public var subscribePath: StaticString = "/sub"
    public var publishPath: StaticString = "/pub"
    /// Bytes a connection may have queued (the socket would not take them) before it is
    /// dropped as a slow consumer.
    public var maxQueuedBytes = 256 * 1024
    /// Read a new connection's request right after accept (listener with TCP_DEFER_ACCEPT).
    public var readOnAccept = false
    public init() {}
}

public struct LoopCounters: Sendable {
    public var accepted = 0, handshakes = 0, refused = 0, published = 0, deliveries = 0
    public var peerIn = 0, peerBatches = 0, slowConsumers = 0, closed = 0
    /// Writes the socket did not take whole (EAGAIN or short): queued for EPOLLOUT.
    public var queued = 0
}

/// One epoll loop over raw descriptors, on the thread (or process) that calls `run`.
///
/// Client sockets are registered once, edge-triggered, for IN|OUT|RDHUP: one epoll_ctl per
/// connection in its life and none when a write hits EAGAIN (a level-triggered OUT would
/// have to be added there and removed after the queue drains, two more syscalls, and would
/// fire on every turn in between). The price is reading until a short read. The listener is
/// level-triggered: a burst is accepted in batches without starving the other descriptors.
public final class Loop {
    public let config: LoopConfig
    public private(set) var counters = LoopCounters()
    let epfd: Int32
    let conns: UnsafeMutablePointer<Connection>
    let capacity: Int
    /// One scratch buffer for every read of this loop: requests and frames are parsed and
    /// reframed where they lie.
    let scratch: UnsafeMutableRawPointer
    let scratchSize = 256 * 1024
    let events: UnsafeMutablePointer<epoll_event>
    let maxEvents: Int32 = 512
    let response: UnsafeMutableRawPointer

    var roomIDs: [String: Int32] = [:]
    var roomNames: ContiguousArray<String> = []
    var members: ContiguousArray<ContiguousArray<Int32>> = []
    var peers: ContiguousArray<Int32> = []
    var doomedList: ContiguousArray<Int32> = []

    public init(config: LoopConfig = LoopConfig()) {
        self.config = config
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        capacity = Int(min(limit.rlim_cur, 1 << 20))
        conns = .allocate(capacity: capacity)
        conns.initialize(repeating: Connection(), count: capacity)
        scratch = .allocate(byteCount: scratchSize, alignment: 16)
        events = .allocate(capacity: Int(maxEvents))
        response = .allocate(byteCount: 256, alignment: 16)
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
        register(fd, Self.IN)
    }

    /// A stream to another loop (socketpair): messages published here go there in one write
    /// per loop turn, and what comes from there is delivered here.
    public func addPeer(_ fd: Int32) {
        conns[Int(fd)].state = Connection.peer
        conns[Int(fd)].slot = Int32(peers.count)
        peers.append(fd)
        register(fd, Self.IN | Self.OUT | Self.ET)
    }

    // MARK: the loop

    public func run() -> Never {
        while true { turn(timeout: -1) }
    }

    /// One epoll_wait and everything it reported; then the peers' batches leave and the
    /// doomed close.
    public func turn(timeout: Int32) {
        let n = epoll_wait(epfd, events, maxEvents, timeout)
        if n < 0 {
            precondition(errno == EINTR, "epoll_wait: \(errno)")
            return
        }
        for i in 0..<Int(n) {
            let flags = events[i].events
            let fd = events[i].data.fd
            switch conns[Int(fd)].state {
            case Connection.listener:
                acceptSome(fd)
            case Connection.http, Connection.open, Connection.peer:
                if flags & Self.OUT != 0 && conns[Int(fd)].outputCount > 0 { flushQueue(fd) }
                if flags & Self.IN != 0 { readable(fd) }
                if flags & (Self.ERR | Self.HUP | Self.RDHUP) != 0 { doom(fd) }
            default:
                break
            }
        }
        for fd in peers where conns[Int(fd)].outputCount > 0 { flushQueue(fd) }
        closeDoomed()
    }

    func acceptSome(_ lfd: Int32) {
        for _ in 0..<64 {
            let fd = chatengine_accept(lfd)
            if fd < 0 { return }  // EAGAIN, or out of files: the listener stays level-triggered
            guard Int(fd) < capacity else { close(fd); continue }
            counters.accepted += 1
            conns[Int(fd)] = Connection(state: Connection.http)
            if config.readOnAccept { readable(fd) }
            // Edge-triggered ADD reports what is already pending, so nothing read above
            // is lost and nothing left unread is missed.
            if conns[Int(fd)].state != Connection.free { register(fd, Self.IN | Self.OUT | Self.RDHUP | Self.ET) }
        }
    }

    // MARK: input

    /// Reads until a short read (edge-triggered), parsing as it goes in the scratch buffer;
    /// bytes of an incomplete request or frame are kept with the connection for next time.
    func readable(_ fd: Int32) {
        var have = 0
        if let p = conns[Int(fd)].input {
            have = Int(conns[Int(fd)].inputCount)
            scratch.copyMemory(from: p, byteCount: have)
            Glibc.free(p)
            conns[Int(fd)].input = nil
            conns[Int(fd)].inputCount = 0
        }
        while true {
            let space = scratchSize - have
            let r = read(fd, scratch + have, space)
            if r < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN { doom(fd); return }
                break
            }
            if r == 0 { doom(fd); return }
            have += r
            let used = process(fd, have)
            if conns[Int(fd)].state == Connection.doomed { return }
            if used < have {
                if used == 0 && have == scratchSize { doom(fd); return }  // a frame larger than the scratch buffer
                if used > 0 { memmove(scratch, scratch + used, have - used) }
            }
            have -= used
            if r < space { break }
        }
        if have > 0 {
            let p = malloc(have)!
            p.copyMemory(from: scratch, byteCount: have)
            conns[Int(fd)].input = p
            conns[Int(fd)].inputCount = Int32(have)
        }
    }

    /// Parses scratch[0..<count] for `fd`; returns the bytes used.
    func process(_ fd: Int32, _ count: Int) -> Int {
        switch conns[Int(fd)].state {
        case Connection.http:
            let parsed = UpgradeParser.parse(UnsafeRawBufferPointer(start: scratch, count: count))
            switch parsed {
            case .incomplete:
                return 0
            case .refused(let why):
                counters.refused += 1
                refuse(fd, why.response)
                return count
            case .request(let request):
                guard upgrade(fd, request) else { return count }
                return request.headLength + frames(fd, request.headLength, count)
            }
        case Connection.open:
            return frames(fd, 0, count)
        case Connection.peer:
            return peerRecords(count)
        default:
            return count
        }
    }

    func refuse(_ fd: Int32, _ response: StaticString) {
        _ = send(fd, response.utf8Start, response.utf8CodeUnitCount, Int32(MSG_NOSIGNAL))
        doom(fd)
    }

    static let switching: StaticString = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "

    /// Routes the request and answers 101; false if refused.
    func upgrade(_ fd: Int32, _ request: UpgradeRequest) -> Bool {
        let b = UnsafeRawBufferPointer(start: scratch, count: request.headLength)
        let path = UnsafeRawBufferPointer(rebasing: b[request.path])
        let role: UInt8
        if equal(path, config.subscribePath) { role = Connection.subscriber }
        else if equal(path, config.publishPath) { role = Connection.publisher }
        else { refuse(fd, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"); return false }
        guard let value = UpgradeParser.queryValue(b, request.query, "room"), !value.isEmpty, value.count <= 200 else {
            refuse(fd, UpgradeRefusal.malformed.response)
            return false
        }
        let room = roomID(UnsafeRawBufferPointer(rebasing: b[value]))
        let head = Self.switching
        var n = head.utf8CodeUnitCount
        response.copyMemory(from: head.utf8Start, byteCount: n)
        n += WebSocketAccept.write(key: UnsafeRawBufferPointer(rebasing: b[request.key]), to: response + n)
        response.storeBytes(of: 0x0A0D_0A0D, toByteOffset: n, as: UInt32.self)  // "\r\n\r\n"
        n += 4
        let sent = send(fd, response, n, Int32(MSG_NOSIGNAL))
        guard sent == n else { doom(fd); return false }  // a fresh socket takes 130 bytes
        counters.handshakes += 1
        conns[Int(fd)].state = Connection.open
        conns[Int(fd)].role = role
        conns[Int(fd)].room = room
        if role == Connection.subscriber {
            conns[Int(fd)].slot = Int32(members[Int(room)].count)
            members[Int(room)].append(fd)
        }
        return true
    }

    func equal(_ b: UnsafeRawBufferPointer, _ s: StaticString) -> Bool {
        b.count == s.utf8CodeUnitCount && memcmp(b.baseAddress!, s.utf8Start, b.count) == 0
    }

    /// The room's index on this loop (created on first use).
    func roomID(_ name: UnsafeRawBufferPointer) -> Int32 {
        let key = String(decoding: name, as: UTF8.self)  // up to 15 bytes: a small string, no allocation
        if let id = roomIDs[key] { return id }
        let id = Int32(roomNames.count)
        roomIDs[key] = id
        roomNames.append(key)
        members.append([])
        return id
    }

    /// Client frames in scratch[from..<count]; returns the bytes of the whole frames used.
    func frames(_ fd: Int32, _ from: Int, _ count: Int) -> Int {
        var at = from
        while at < count && conns[Int(fd)].state == Connection.open {
            let p = scratch + at
            switch Frames.parseHeader(p, count - at) {
            case .incomplete:
                return at - from
            case .invalid:
                closeWith(fd, 1002)
                return count - from
            case .frame(let h):
                if count - at < h.frameLength {
                    return at - from
                }
                guard let key = h.mask else {
                    closeWith(fd, 1002)
                    return count - from
                }
                at += h.frameLength
                switch h.opcode {
                case Opcode.text, Opcode.binary:
                    if conns[Int(fd)].role == Connection.publisher {
                        guard h.fin else { closeWith(fd, 1003); return count - from }
                        let (offset, length) = Frames.reframeInPlace(p, h)
                        publish(conns[Int(fd)].room, UnsafeRawPointer(p + offset), length)
                    }
                case Opcode.close:
                    let payload = p + h.headerLength
                    Frames.unmask(payload, count: h.payloadLength, key: key)
                    let code = h.payloadLength >= 2 ? UInt16(payload.load(as: UInt8.self)) << 8 | UInt16(payload.load(fromByteOffset: 1, as: UInt8.self)) : 1000
                    closeWith(fd, code)
                case Opcode.ping:
                    let (offset, length) = Frames.reframeInPlace(p, h)
                    (p + offset).storeBytes(of: 0x80 | Opcode.pong, as: UInt8.self)
                    write(fd, p + offset, length)
                case Opcode.pong:
                    break
                default:
                    closeWith(fd, 1003)  // continuations: no fragmented messages in the probe
                }
            }
        }
        return at - from
    }

    /// Sends a close frame with `code` and drops the connection at the end of the turn.
    func closeWith(_ fd: Int32, _ code: UInt16) {
        var frame: (UInt8, UInt8, UInt8, UInt8) = (0x88, 2, UInt8(code >> 8), UInt8(code & 0xFF))
        _ = withUnsafeBytes(of: &frame) { send(fd, $0.baseAddress!, 4, Int32(MSG_NOSIGNAL)) }
        doom(fd)
    }

    // MARK: fan-out

    /// The server frame `bytes` to every subscriber of `room` here and, as one record per
    /// message in each peer's batch, to every other loop.
    func publish(_ room: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        counters.published += 1
        deliver(room, bytes, length)
        guard !peers.isEmpty else { return }
        var name = roomNames[Int(room)]
        name.withUTF8 { n in
            for fd in peers {
                var header: (UInt32, UInt16) = (UInt32(2 + n.count + length), UInt16(n.count))
                withUnsafeBytes(of: &header) { h in
                    enqueue(fd, h.baseAddress!, 6, limit: Int.max)
                }
                enqueue(fd, n.baseAddress!, n.count, limit: Int.max)
                enqueue(fd, bytes, length, limit: Int.max)
            }
        }
    }

    /// The same bytes written to each member's socket; queued only where a socket is full.
    @inline(__always)
    func deliver(_ room: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        members[Int(room)].withUnsafeBufferPointer { list in
            counters.deliveries += list.count
            for fd in list { write(fd, bytes, length) }
        }
    }

    /// Records from a peer in scratch[0..<count]: [u32 length][u16 room length][room][frame].
    func peerRecords(_ count: Int) -> Int {
        var at = 0
        var records = 0
        while count - at >= 6 {
            let length = Int(scratch.loadUnaligned(fromByteOffset: at, as: UInt32.self))
            guard count - at - 4 >= length else { break }
            let nameLength = Int(scratch.loadUnaligned(fromByteOffset: at + 4, as: UInt16.self))
            let name = UnsafeRawBufferPointer(start: scratch + at + 6, count: nameLength)
            let key = String(decoding: name, as: UTF8.self)
            if let room = roomIDs[key] {
                deliver(room, scratch + at + 6 + nameLength, length - 2 - nameLength)
            }
            at += 4 + length
            records += 1
        }
        if records > 0 {
            counters.peerIn += records
            counters.peerBatches += 1
        }
        return at
    }

    // MARK: output

    /// Writes straight to the socket; what it does not take is queued (and sent on EPOLLOUT).
    @inline(__always)
    func write(_ fd: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        let c = conns + Int(fd)
        if c.pointee.state != Connection.open { return }
        if c.pointee.outputCount > 0 {
            enqueue(fd, bytes, length, limit: config.maxQueuedBytes)
            return
        }
        let r = send(fd, bytes, length, Int32(MSG_NOSIGNAL))
        if r == length { return }
        counters.queued += 1
        if r < 0 {
            if errno == EAGAIN { enqueue(fd, bytes, length, limit: config.maxQueuedBytes) } else { doom(fd) }
            return
        }
        enqueue(fd, bytes + r, length - r, limit: config.maxQueuedBytes)
    }

    func enqueue(_ fd: Int32, _ bytes: UnsafeRawPointer, _ length: Int, limit: Int) {
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
            let r = send(fd, c.pointee.output! + Int(c.pointee.outputHead), Int(c.pointee.outputCount), Int32(MSG_NOSIGNAL))
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

    func doom(_ fd: Int32) {
        let c = conns + Int(fd)
        guard c.pointee.state == Connection.http || c.pointee.state == Connection.open else {
            precondition(c.pointee.state != Connection.peer, "a peer link failed")
            return
        }
        c.pointee.state = Connection.doomed
        doomedList.append(fd)
    }

    func closeDoomed() {
        guard !doomedList.isEmpty else { return }
        for fd in doomedList {
            let c = conns + Int(fd)
            if c.pointee.role == Connection.subscriber && c.pointee.room >= 0 {
                let room = Int(c.pointee.room), slot = Int(c.pointee.slot)
                let last = members[room].removeLast()
                if last != fd {
                    members[room][slot] = last
                    conns[Int(last)].slot = Int32(slot)
                }
            }
            Glibc.free(c.pointee.input)
            Glibc.free(c.pointee.output)
            c.pointee = Connection()
            close(fd)
            counters.closed += 1
        }
        doomedList.removeAll(keepingCapacity: true)
    }
}
