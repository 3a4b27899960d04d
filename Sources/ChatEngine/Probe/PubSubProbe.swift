import Glibc

/// nginx+nchan's WebSocket endpoints (`/sub?room=R`, `/pub?room=R`) on a `Loop`, so that
/// chatbench's `--protocol nchan` mode measures the engine and nchan in the same runs
/// (docs/ENGINE-PROBE.md). A measurement: no fragments, no UTF-8 check.
///
/// Cross-worker: one stream per pair of processes. A publication is appended to each
/// peer's queue as a record ([u32 length][u16 room length][room][server frame]) and each
/// queue leaves in one write per loop turn: one hop per batch, not per message.
public final class PubSubProbe: LoopApplication {
    public static let subscriber: UInt8 = 0
    public static let publisher: UInt8 = 1
    public static let peer: UInt8 = 2

    public private(set) var published = 0, deliveries = 0, peerIn = 0, peerBatches = 0
    var roomIDs: [String: Int32] = [:]
    var roomNames: ContiguousArray<String> = []
    var members: ContiguousArray<ContiguousArray<Int32>> = []
    var peers: ContiguousArray<Int32> = []

    public init() {}

    /// A stream to another process's loop.
    public func addPeer(_ fd: Int32, on loop: Loop) {
        loop.addStream(fd, kind: Self.peer)
        peers.append(fd)
    }

    public func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse) {
        guard case .request(let request) = parse else {
            if case .refused(let why) = parse { loop.refuse(fd, why.response) }
            return
        }
        let b = UnsafeRawBufferPointer(bytes)
        let path = UnsafeRawBufferPointer(rebasing: b[request.path])
        let role: UInt8
        if UpgradeParser.equals(path, "/sub") { role = Self.subscriber }
        else if UpgradeParser.equals(path, "/pub") { role = Self.publisher }
        else { return loop.refuse(fd, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") }
        guard let value = UpgradeParser.queryValue(b, request.query, "room"), !value.isEmpty, value.count <= 200 else {
            return loop.refuse(fd, UpgradeRefusal.malformed.response)
        }
        let room = roomID(UnsafeRawBufferPointer(rebasing: b[value]))
        guard loop.upgrade(fd, request, in: b) else { return }
        loop.conns[Int(fd)].kind = role
        loop.conns[Int(fd)].group = room
        if role == Self.subscriber {
            loop.conns[Int(fd)].index = Int32(members[Int(room)].count)
            members[Int(room)].append(fd)
        }
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

    public func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        if loop.conns[Int(fd)].kind == Self.peer { return peerRecords(loop, p, count) }
        return frames(loop, fd, p, count)
    }

    public func closed(_ loop: Loop, fd: Int32) {
        let c = loop.conns[Int(fd)]
        precondition(c.kind != Self.peer, "a peer link failed")
        guard c.kind == Self.subscriber && c.group >= 0 else { return }
        let room = Int(c.group), slot = Int(c.index)
        let last = members[room].removeLast()
        if last != fd {
            members[room][slot] = last
            loop.conns[Int(last)].index = Int32(slot)
        }
    }

    public func acceptFailed(_ loop: Loop, listener: Int32, errno: Int32) {}

    /// Client frames in p[0..<count]; returns the bytes of the whole frames used.
    func frames(_ loop: Loop, _ fd: Int32, _ base: UnsafeMutableRawPointer, _ count: Int) -> Int {
        var at = 0
        while at < count && loop.conns[Int(fd)].state == Connection.open {
            let p = base + at
            switch Frames.parseHeader(p, count - at) {
            case .incomplete:
                return at
            case .invalid:
                loop.closeWith(fd, 1002)
                return count
            case .frame(let h):
                // Not `frameLength`: a claimed 64-bit length near 2^63 would overflow the sum.
                if count - at - h.headerLength < h.payloadLength { return at }
                guard let key = h.mask else {
                    loop.closeWith(fd, 1002)
                    return count
                }
                at += h.frameLength
                switch h.opcode {
                case Opcode.text, Opcode.binary:
                    if loop.conns[Int(fd)].kind == Self.publisher {
                        guard h.fin else { loop.closeWith(fd, 1003); return count }
                        let (offset, length) = Frames.reframeInPlace(p, h)
                        publish(loop, loop.conns[Int(fd)].group, UnsafeRawPointer(p + offset), length)
                    }
                case Opcode.close:
                    let payload = p + h.headerLength
                    Frames.unmask(payload, count: h.payloadLength, key: key)
                    let code = h.payloadLength >= 2 ? UInt16(payload.load(as: UInt8.self)) << 8 | UInt16(payload.load(fromByteOffset: 1, as: UInt8.self)) : 1000
                    loop.closeWith(fd, code)
                case Opcode.ping:
                    let (offset, length) = Frames.reframeInPlace(p, h)
                    (p + offset).storeBytes(of: 0x80 | Opcode.pong, as: UInt8.self)
                    loop.write(fd, p + offset, length)
                case Opcode.pong:
                    break
                default:
                    loop.closeWith(fd, 1003)  // continuations: no fragmented messages in the probe
                }
            }
        }
        return at
    }

    /// The server frame `bytes` to every subscriber of `room` here and, as one record per
    /// message in each peer's batch, to every other loop.
    func publish(_ loop: Loop, _ room: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        published += 1
        deliver(loop, room, bytes, length)
        guard !peers.isEmpty else { return }
        var name = roomNames[Int(room)]
        name.withUTF8 { n in
            for fd in peers {
                var header: (UInt32, UInt16) = (UInt32(2 + n.count + length), UInt16(n.count))
                withUnsafeBytes(of: &header) { h in
                    loop.enqueue(fd, h.baseAddress!, 6, limit: Int.max)
                }
                loop.enqueue(fd, n.baseAddress!, n.count, limit: Int.max)
                loop.enqueue(fd, bytes, length, limit: Int.max)
            }
        }
    }

    /// The same bytes written to each member's socket; queued only where a socket is full.
    @inline(__always)
    func deliver(_ loop: Loop, _ room: Int32, _ bytes: UnsafeRawPointer, _ length: Int) {
        members[Int(room)].withUnsafeBufferPointer { list in
            deliveries += list.count
            for fd in list { loop.write(fd, bytes, length) }
        }
    }

    /// Records from a peer in p[0..<count]: [u32 length][u16 room length][room][frame].
    func peerRecords(_ loop: Loop, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        var at = 0
        var records = 0
        while count - at >= 6 {
            let length = Int(p.loadUnaligned(fromByteOffset: at, as: UInt32.self))
            guard count - at - 4 >= length else { break }
            let nameLength = Int(p.loadUnaligned(fromByteOffset: at + 4, as: UInt16.self))
            let name = UnsafeRawBufferPointer(start: p + at + 6, count: nameLength)
            let key = String(decoding: name, as: UTF8.self)
            if let room = roomIDs[key] {
                deliver(loop, room, p + at + 6 + nameLength, length - 2 - nameLength)
            }
            at += 4 + length
            records += 1
        }
        if records > 0 {
            peerIn += records
            peerBatches += 1
        }
        return at
    }
}
