#if canImport(Glibc)
import Glibc
#endif

/// What a connection does once it is open.
enum Mode: String, Codable {
    /// Handshake and hello, then stay open (the `connect` scenario closes them all after).
    case connect
    /// Handshake, hello, join its room, then receive (and publish, for publishers).
    case member
    /// Handshake, hello, join, leave, WebSocket close: one churn cycle.
    case churn
}

/// One WebSocket client connection, written for a low cost per message: a raw non-blocking
/// socket on its loop (`BenchLoop`), a hand-written client handshake, a frame parser
/// working in place on the received bytes, and a scan for `"seq":` and
/// `"text":"t=...;p=...;n=..."` instead of decoding JSON. With `--transport sse` a member
/// that does not publish reads an event stream instead (`GET /sse`, a `200` head, then
/// events): each event's `data:` is the JSON a text frame would carry, and goes through the
/// same scan. It lives on its loop's `LoopShard` and counts into that shard's counters (no
/// locks, no atomics). Not Sendable: it never leaves its loop's thread.
final class BenchConnection {
    enum State { case connecting, handshaking, open, closing, closed }

    let index: Int
    let room: Int
    let mode: Mode
    unowned(unsafe) let shard: LoopShard
    private(set) var state = State.connecting
    private var fd: Int32 = -1
    /// Bytes after the last complete frame (or of an incomplete head), waiting for the next read.
    private var pendingInput: [UInt8] = []
    /// Bytes the socket would not take yet; they leave on the next EPOLLOUT.
    private var output: [UInt8] = []
    private var outputSent = 0
    var startNs: UInt64 = 0
    private var setupReported = false
    private var countedOpen = false
    private var joined = false
    private var awaitingJoin = false
    private var left = false
    /// Last seq received in the room (-1: not joined yet).
    private var lastSeq = -1
    /// The last counter seen from each publisher of the room (slot = publisher / rooms).
    private var publisherLast: PublisherCounters
    /// Publisher id (global index), or -1.
    let publisherID: Int
    /// Messages this publisher sent in the current step, and ever (the `n` it writes).
    var stepSent = 0
    private var counter = 0
    /// nchan: this connection only publishes (to `pubPath?room=R`); it receives no room messages.
    let publishOnly: Bool
    /// `--transport sse`: an event stream (`GET ssePath?rooms=R&user=U`) instead of a
    /// WebSocket; it never writes after its request. Publishers stay WebSocket members.
    let sse: Bool
    /// `--stalled`: this member stopped reading; nothing it gets is counted, and it is not
    /// in the shard's `members`.
    private(set) var stalled = false
    /// Not reading (a stalled member until `resumeReading`): the kernel's receive buffer
    /// fills, then the server's send buffer.
    private var paused = false
    /// A stalled member saw the server's close frame, or a socket error.
    private var sawClose = false
    private var sawError = false

    init(index: Int, room: Int, mode: Mode, publisherID: Int, publisherSlots: Int, publishOnly: Bool = false, shard: LoopShard) {
        self.index = index
        self.room = room
        self.mode = mode
        self.publisherID = publisherID
        self.publishOnly = publishOnly
        self.shard = shard
        sse = shard.spec.sse && publisherID < 0 && mode != .churn
        // nchan has no seq: a member expects each publisher's counter to start at 1 (it
        // subscribed before anything was published), so 0 is "nothing seen yet".
        self.publisherLast = PublisherCounters(slots: publisherSlots, initial: shard.spec.nchan ? 0 : -1)
    }

    var isOpen: Bool { state == .open && (joined || publishOnly) }

    var isConnecting: Bool { state == .connecting }

    /// Publishers write a frame every few milliseconds: TCP_NODELAY, so that none waits for
    /// the ACK of the one before. Everyone else writes only after the server answered what
    /// it wrote before (request, join, leave, pong, close), when nothing is in flight: Nagle
    /// delays nothing there, and the setsockopt is saved.
    var writesOften: Bool { publisherID >= 0 }

    /// A stalled member whose connection the server ended (close frame or TCP close seen).
    var gone: Bool { state == .closed || sawClose }

    /// Stops reading, so the kernel's receive buffer fills, then the server's send buffer.
    /// False when not open and joined.
    func stall() -> Bool {
        guard state == .open, joined, !stalled else { return false }
        stalled = true
        paused = true
        shard.members[room] -= 1
        return true
    }

    /// Reads again (the end of the run): whatever the kernel buffered, then the server's
    /// close frame or the TCP close if it cut this member off.
    func resumeReading() {
        guard stalled, paused, state != .closed else { return }
        paused = false
        readAll()
    }

    // MARK: lifecycle

    /// connect() started on `fd` (the loop watches it for completion and for the timeout).
    func connecting(fd: Int32) {
        self.fd = fd
    }

    /// Events from the loop: connect completion, input, write space, the peer's close.
    @inline(__always)
    func ready(_ events: UInt32) {
        if state == .connecting {
            if events & (BenchLoop.ERR | BenchLoop.HUP) != 0 {
                var code: Int32 = 0
                var length = socklen_t(4)
                _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &length)
                dropUnconnected(String(cString: strerror(code == 0 ? ECONNREFUSED : code)))
                return
            }
            guard events & BenchLoop.OUT != 0 else { return }
            active()
        } else if events & BenchLoop.OUT != 0 && outputSent < output.count {
            flush()
        }
        if events & (BenchLoop.IN | BenchLoop.RDHUP | BenchLoop.HUP | BenchLoop.ERR) != 0 && !paused && state != .closed {
            readAll()
        }
    }

    /// The connect timeout passed while still connecting.
    func connectTimedOut() {
        dropUnconnected("connect timeout (\(shard.spec.connectTimeoutMs) ms)")
    }

    private func dropUnconnected(_ kind: String) {
        state = .closed
        shard.loop.remove(fd)
        shard.connectionClosedUnconnected(self)
        connectFailed(kind)
    }

    /// Connected: the request goes out.
    private func active() {
        state = .handshaking
        let spec = shard.spec
        var request: [UInt8] = []
        request.reserveCapacity(256)
        request.append(contentsOf: "GET ".utf8)
        if sse {
            // The room is joined by the URL (`connect` only wants the hello: no room).
            request.append(contentsOf: spec.ssePath.utf8)
            request.append(UInt8(ascii: "?"))
            if mode == .member {
                request.append(contentsOf: "rooms=".utf8)
                request.append(contentsOf: shard.roomNames[room])
                request.append(UInt8(ascii: "&"))
            }
            request.append(contentsOf: "user=".utf8)
            request.append(contentsOf: spec.userPrefix.utf8)
            Scan.appendDecimal(&request, index)
            request.append(contentsOf: shard.requestTail)
            request.append(contentsOf: "Accept: text/event-stream\r\n\r\n".utf8)
        } else {
            if !spec.nchan {
                request.append(contentsOf: spec.path.utf8)
                request.append(contentsOf: "?user=".utf8)
                request.append(contentsOf: spec.userPrefix.utf8)
                Scan.appendDecimal(&request, index)
                if spec.joinInURL && mode == .member {
                    request.append(contentsOf: "&rooms=".utf8)
                    request.append(contentsOf: shard.roomNames[room])
                }
            } else {
                request.append(contentsOf: (publishOnly ? spec.pubPath : spec.path).utf8)
                request.append(contentsOf: "?room=".utf8)
                request.append(contentsOf: shard.roomNames[room])
            }
            request.append(contentsOf: shard.requestTail)
            request.append(contentsOf: Self.upgradeHeaders)
        }
        enqueue(request)
        flush()
    }

    private static let upgradeHeaders = Array("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8)

    /// The connection is gone (the peer closed it, an error, or this side closed it).
    private func inactive() {
        let wasClosing = state == .closing
        state = .closed
        shard.loop.remove(fd)
        output = []
        pendingInput = []
        if countedOpen {
            shard.counters.open -= 1
            countedOpen = false
        }
        if joined {
            if !stalled { shard.members[room] -= 1 }
            joined = false
        }
        if mode == .churn && wasClosing && left {
            let now = monotonicNanos()
            shard.counters.cycles += 1
            LatencyHist.record(&shard.cycle, nanos: now &- startNs)
            finishSetup(ok: true, now: now)
        } else if !setupReported {
            // Gone during its setup.
            if !shard.stopping { shard.counters.unexpectedCloses += 1 }
            if mode == .churn { shard.counters.cycleFailures += 1 }
            finishSetup(ok: false, now: monotonicNanos())
        } else if stalled {
            // Expected: the server may cut a member off that does not read.
            if !sawClose && !sawError && !shard.stopping { shard.noteStalled(sse ? "tcp close" : "tcp close without a close frame") }
        } else if !wasClosing && !shard.stopping {
            // An established connection the server (or the network) closed.
            shard.counters.unexpectedCloses += 1
        }
        shard.connectionClosed(self)
    }

    /// A socket error on an established connection: noted, and the connection closed.
    private func socketError(_ call: String, _ code: Int32) {
        let text = "\(call): \(String(cString: strerror(code))) (errno: \(code))"
        if stalled {
            sawError = true
            if !shard.stopping { shard.noteStalled("socket: \(text)") }
        } else {
            shard.noteError("socket: \(text)")
        }
        inactive()
    }

    /// Closes now (a close frame was exchanged, or the handshake failed).
    private func closeConnection() {
        guard state != .closed else { return }
        inactive()
    }

    /// Setup is over (well or not): frees a slot of the bounded concurrency.
    private func finishSetup(ok: Bool, now: UInt64) {
        guard !setupReported else { return }
        setupReported = true
        shard.setupFinished(ok: ok, now: now, started: startNs)
    }

    /// The end of a run: an abortive close (SO_LINGER 0), so no TIME_WAIT sockets are left
    /// on the load generator's ports to slow the kernel's port search in the next run.
    func close() {
        guard state != .closed else { return }
        if state == .connecting {
            dropUnconnected("closed while connecting")
            return
        }
        var option = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<linger>.size))
        inactive()
    }

    // MARK: input

    /// Reads until the socket is drained (a short read: the registration is edge-triggered).
    /// Any number of frames per read, a frame split over reads: the bytes after the last
    /// complete frame wait in `pendingInput` for the next read.
    private func readAll() {
        let scratch = shard.loop.scratch
        let size = BenchLoop.scratchSize
        while state != .closed && !paused {
            let n = recv(fd, scratch, size, 0)
            if n > 0 {
                shard.nowNs = monotonicNanos()
                input(scratch, n)
                if n < size { return }
            } else if n == 0 {
                inactive()
                return
            } else {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK { return }
                if code == EINTR { continue }
                socketError("read", code)
                return
            }
        }
    }

    private func input(_ p: UnsafeMutableRawPointer, _ n: Int) {
        if pendingInput.isEmpty {
            let consumed = process(UnsafeRawBufferPointer(start: p, count: n))
            if consumed < n && state != .closed {
                pendingInput.append(contentsOf: UnsafeRawBufferPointer(start: p + consumed, count: n - consumed))
            }
        } else {
            pendingInput.append(contentsOf: UnsafeRawBufferPointer(start: p, count: n))
            var bytes: [UInt8] = []
            swap(&bytes, &pendingInput)
            let consumed = bytes.withUnsafeBytes { process($0) }
            if consumed < bytes.count && state != .closed {
                bytes.removeFirst(consumed)
                pendingInput = bytes
            }
        }
    }

    /// Handles what `raw` holds (the response head first); returns the bytes used.
    private func process(_ raw: UnsafeRawBufferPointer) -> Int {
        var used = 0
        if state == .handshaking {
            guard let base = raw.baseAddress, let at = Scan.find(base, raw.count, "\r\n\r\n") else {
                if raw.count > 16_384 { failHandshake(status: "oversized response head") }
                return 0
            }
            let headEnd = at + 4
            let expected: StaticString = sse ? "HTTP/1.1 200" : "HTTP/1.1 101"
            guard headEnd >= 12, memcmp(base, expected.utf8Start, 12) == 0 else {
                // ("\r\n" is one Character: split on newlines, not on "\r".)
                let head = String(decoding: UnsafeRawBufferPointer(rebasing: raw[0..<min(headEnd, 40)]), as: UTF8.self)
                failHandshake(status: String(head.split(whereSeparator: \.isNewline).first ?? ""))
                return 0
            }
            used = headEnd
            state = .open
            countedOpen = true
            shard.counters.open += 1
            shard.counters.handshakes += 1
            LatencyHist.record(&shard.handshake, nanos: shard.nowNs &- startNs)
            if shard.spec.nchan { nchanOpened() }
            // A stream's room is joined by its URL: its `joined` event answers the join.
            if sse && mode == .member { awaitingJoin = true }
        }
        let rest = UnsafeRawBufferPointer(rebasing: raw[used...])
        return used + (sse ? parseEvents(rest) : parseFrames(rest))
    }

    /// connect() failed: no connection became active.
    func connectFailed(_ kind: String) {
        guard !setupReported else { return }
        shard.counters.connectFailures += 1
        if mode == .churn { shard.counters.cycleFailures += 1 }
        shard.noteError("connect: " + kind)
        finishSetup(ok: false, now: monotonicNanos())
    }

    private func failHandshake(status: String) {
        shard.counters.handshakeFailures += 1
        if mode == .churn { shard.counters.cycleFailures += 1 }
        shard.noteError("handshake: \(status)")
        finishSetup(ok: false, now: monotonicNanos())
        state = .closing
        closeConnection()
    }

    /// Parses every complete frame; returns the bytes consumed.
    private func parseFrames(_ raw: UnsafeRawBufferPointer) -> Int {
        var i = 0
        let n = raw.count
        while n - i >= 2 && state != .closed {
            let b0 = raw[i], b1 = raw[i + 1]
            var length = Int(b1 & 0x7F)
            var head = 2
            if length == 126 {
                if n - i < 4 { break }
                length = Int(raw[i + 2]) << 8 | Int(raw[i + 3])
                head = 4
            } else if length == 127 {
                if n - i < 10 { break }
                length = 0
                for k in 2..<10 { length = length << 8 | Int(raw[i + k]) }
                head = 10
            }
            if b1 & 0x80 != 0 { head += 4 }  // a server never masks; skip the key if it did
            if n - i < head + length { break }
            let payload = UnsafeRawBufferPointer(rebasing: raw[(i + head)..<(i + head + length)])
            i += head + length
            frame(opcode: b0 & 0x0F, payload: payload)
        }
        return i
    }

    /// SSE: every complete event (its lines up to an empty line) is handled, and the bytes
    /// up to the end of the last one are consumed; an event cut by the read waits for the
    /// next. Only the `data:` line is looked at: chatgw's data is the JSON a WebSocket client
    /// gets for the message, whose `type` is the event's name, so it goes to `text` as a
    /// text frame's payload does. `id:`, `event:`, `retry:` and comments (`: hb`) are skipped.
    private func parseEvents(_ raw: UnsafeRawBufferPointer) -> Int {
        guard let base = raw.baseAddress else { return 0 }
        let n = raw.count
        var i = 0, consumed = 0
        var dataStart = -1, dataEnd = 0
        while i < n && state != .closed, let hit = memchr(base + i, 0x0A, n - i) {
            let eol = base.distance(to: UnsafeRawPointer(hit))
            let end = eol > i && raw[eol - 1] == 0x0D ? eol - 1 : eol
            if end == i {
                // The empty line: the event is complete.
                if dataStart >= 0 { text(UnsafeRawBufferPointer(rebasing: raw[dataStart..<dataEnd])) }
                dataStart = -1
                consumed = eol + 1
            } else if end - i >= 5 && raw[i] == UInt8(ascii: "d") && raw[i + 1] == UInt8(ascii: "a")
                        && raw[i + 2] == UInt8(ascii: "t") && raw[i + 3] == UInt8(ascii: "a") && raw[i + 4] == UInt8(ascii: ":") {
                dataStart = end - i > 5 && raw[i + 5] == 0x20 ? i + 6 : i + 5
                dataEnd = end
            }
            i = eol + 1
        }
        return consumed
    }

    private func frame(opcode: UInt8, payload: UnsafeRawBufferPointer) {
        switch opcode {
        case 0x1:
            text(payload)
        case 0x8:
            if stalled && !sawClose {
                sawClose = true
                shard.noteStalled(payload.count >= 2 ? "close \(Int(payload[0]) << 8 | Int(payload[1]))" : "close (no code)")
            }
            // The server's close: answer it (unless we started the handshake) and drop TCP.
            if state != .closing {
                state = .closing
                Self.normalClosure.withUnsafeBytes { writeFrame(opcode: 0x8, payload: $0) }
                flush()
            }
            closeConnection()
        case 0x9:
            shard.counters.pingsAnswered += 1
            writeFrame(opcode: 0xA, payload: payload)
            flush()
        case 0xA:
            break
        default:
            shard.counters.unparsed += 1
        }
    }

    // MARK: application messages

    private func text(_ p: UnsafeRawBufferPointer) {
        if stalled {
            // Left out of every count; only a bye (the reason it is being cut off) is kept.
            if !shard.spec.nchan && p.count > 11 && p[9] == UInt8(ascii: "b") {
                shard.noteStalled("bye " + (Scan.stringField(p, "\"reason\":\"") ?? "?"))
            }
            return
        }
        if shard.spec.nchan {
            // A publisher's socket gets nchan's status replies; only members count messages.
            if !publishOnly { nchanMessage(p) }
            return
        }
        // Every server frame starts {"type":"<type>" (ChatProtocol's JSONWriter).
        guard p.count > 11, p[1] == UInt8(ascii: "\""), p[2] == UInt8(ascii: "t") else {
            shard.counters.unparsed += 1
            return
        }
        switch p[9] {
        case UInt8(ascii: "m"):
            message(p)
        case UInt8(ascii: "h"):
            if p[10] == UInt8(ascii: "e") { hello() }
        case UInt8(ascii: "j"):
            joinedRoom(p)
        case UInt8(ascii: "l"):
            if mode == .churn && state == .open {
                left = true
                state = .closing
                Self.normalClosure.withUnsafeBytes { writeFrame(opcode: 0x8, payload: $0) }
                flush()
            }
        case UInt8(ascii: "e"):
            shard.counters.errors += 1
            let code = Scan.stringField(p, "\"code\":\"") ?? "?"
            shard.noteError("error " + code)
            if awaitingJoin {
                awaitingJoin = false
                shard.counters.joinFailures += 1
                finishSetup(ok: false, now: shard.nowNs)
                if mode == .churn {
                    shard.counters.cycleFailures += 1
                    state = .closing
                    closeConnection()
                }
            }
        case UInt8(ascii: "b"):
            shard.counters.byes += 1
            shard.noteError("bye " + (Scan.stringField(p, "\"reason\":\"") ?? "?"))
        case UInt8(ascii: "g"):
            shard.counters.gaps += 1
        default:
            break
        }
    }

    /// nchan: the 101 is the whole setup (the subscription is in the URL; no hello, no join).
    private func nchanOpened() {
        switch mode {
        case .connect:
            shard.counters.hellos += 1
            finishSetup(ok: true, now: shard.nowNs)
        case .member:
            if !publishOnly {
                shard.counters.joins += 1
                joined = true
                shard.members[room] += 1
            }
            finishSetup(ok: true, now: shard.nowNs)
        case .churn:
            finishSetup(ok: false, now: shard.nowNs)
        }
    }

    /// nchan: the frame is the publisher's text itself, `t=<ns>;p=<publisher>;n=<counter>...`.
    /// Without a seq, holes, duplicates and order are checked per (publisher, counter).
    @inline(__always)
    private func nchanMessage(_ p: UnsafeRawBufferPointer) {
        guard p.count > 2, p[0] == UInt8(ascii: "t"), p[1] == UInt8(ascii: "=") else {
            shard.counters.unparsed += 1
            return
        }
        var at = 2
        let t = UInt64(Scan.digits(p, &at))
        guard let (publisher, n) = Scan.publisherAndCounter(p, &at) else {
            shard.counters.unparsed += 1
            return
        }
        let rooms = shard.spec.rooms
        if publisher % rooms == room {
            let slot = publisher / rooms
            if slot < publisherLast.count {
                let last = publisherLast[slot]
                if n == last {
                    shard.counters.duplicates += 1
                    return
                }
                if n < last {
                    shard.counters.orderViolations += 1
                } else {
                    if n > last + 1 { shard.counters.holes += Int(n - last - 1) }
                    publisherLast[slot] = n
                }
            }
        } else {
            shard.counters.unparsed += 1  // another room's publisher: cannot happen with nchan_channel_id $arg_room
        }
        shard.counters.deliveries += 1
        shard.roomReceived[room] += 1
        let now = shard.nowNs
        LatencyHist.record(&shard.latency, nanos: now > t ? now - t : 0)
    }

    private func hello() {
        shard.counters.hellos += 1
        switch mode {
        case .connect:
            finishSetup(ok: true, now: shard.nowNs)
        case .member, .churn:
            guard !sse else { return }  // a stream joined by its URL, and cannot send
            awaitingJoin = true
            if mode == .member && shard.spec.joinInURL { return }  // joined by its URL too
            sendJSON(shard.joinRequests[room])
        }
    }

    private func joinedRoom(_ p: UnsafeRawBufferPointer) {
        guard awaitingJoin else { return }
        awaitingJoin = false
        shard.counters.joins += 1
        lastSeq = Scan.intField(p, "\"seq\":", from: 10) ?? 0
        switch mode {
        case .member:
            joined = true
            shard.members[room] += 1
            finishSetup(ok: true, now: shard.nowNs)
        case .churn:
            LatencyHist.record(&shard.setup, nanos: shard.nowNs &- startNs)
            sendJSON(shard.leaveRequests[room])
        case .connect:
            break
        }
    }

    /// A room message: order, holes and duplicates by seq; latency and per-publisher order
    /// from the text the publisher wrote.
    @inline(__always)
    private func message(_ p: UnsafeRawBufferPointer) {
        var at = 20
        guard let seq = Scan.int(p, after: "\"seq\":", from: &at) else {
            shard.counters.unparsed += 1
            return
        }
        if lastSeq >= 0 {
            if seq <= lastSeq {
                shard.counters.duplicates += 1
                return
            }
            if seq > lastSeq + 1 { shard.counters.holes += seq - lastSeq - 1 }
        }
        lastSeq = seq
        shard.counters.deliveries += 1
        shard.roomReceived[room] += 1
        guard let sentAt = Scan.int(p, after: "\"text\":\"t=", from: &at) else { return }
        let now = shard.nowNs
        let t = UInt64(sentAt)
        LatencyHist.record(&shard.latency, nanos: now > t ? now - t : 0)
        guard let (publisher, n) = Scan.publisherAndCounter(p, &at) else { return }
        let rooms = shard.spec.rooms
        if publisher % rooms == room {
            let slot = publisher / rooms
            if slot < publisherLast.count {
                if n <= publisherLast[slot] { shard.counters.orderViolations += 1 }
                publisherLast[slot] = n
            }
        }
    }

    // MARK: output

    /// `{"type":"send","room":R,"text":"t=<now>;p=<id>;n=<counter><padding>"}`, masked.
    func publish(now: UInt64) {
        guard state == .open else { return }
        counter += 1
        stepSent += 1
        var json: [UInt8] = []
        swap(&json, &shard.scratch)
        json.removeAll(keepingCapacity: true)
        let nchan = shard.spec.nchan
        if nchan {
            json.append(contentsOf: [UInt8(ascii: "t"), UInt8(ascii: "=")])
        } else {
            json.append(contentsOf: shard.sendPrefixes[room])
        }
        Scan.appendDecimal(&json, Int(now))
        json.append(contentsOf: [UInt8(ascii: ";"), UInt8(ascii: "p"), UInt8(ascii: "=")])
        Scan.appendDecimal(&json, publisherID)
        json.append(contentsOf: [UInt8(ascii: ";"), UInt8(ascii: "n"), UInt8(ascii: "=")])
        Scan.appendDecimal(&json, counter)
        let textStart = nchan ? 0 : shard.sendPrefixes[room].count - 2
        let padding = shard.spec.textBytes - (json.count - textStart)
        if padding > 0 { json.append(contentsOf: repeatElement(UInt8(ascii: "x"), count: padding)) }
        if !nchan { json.append(contentsOf: [UInt8(ascii: "\""), UInt8(ascii: "}")]) }
        json.withUnsafeBytes { writeFrame(opcode: 0x1, payload: $0) }
        shard.scratch = json
        shard.counters.sent += 1
        shard.roomSent[room] += 1
    }

    /// Sends what is queued; what the socket does not take waits for EPOLLOUT.
    func flush() {
        guard outputSent < output.count, state != .closed else { return }
        while outputSent < output.count {
            let n = output.withUnsafeBytes { send(fd, $0.baseAddress! + outputSent, $0.count - outputSent, Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                outputSent += n
            } else {
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN || code == EWOULDBLOCK { return }
                socketError("write", code)
                return
            }
        }
        output.removeAll(keepingCapacity: writesOften)
        outputSent = 0
    }

    private func enqueue(_ bytes: [UInt8]) {
        if output.isEmpty { output = bytes } else { output.append(contentsOf: bytes) }
    }

    private func sendJSON(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { writeFrame(opcode: 0x1, payload: $0) }
        flush()
    }

    private static let mask: (UInt8, UInt8, UInt8, UInt8) = (0x5A, 0x13, 0xC7, 0x2E)
    /// A close frame's payload: 1000, normal closure.
    private static let normalClosure: [UInt8] = [0x03, 0xE8]

    /// One client frame, queued: FIN, opcode, masked payload.
    private func writeFrame(opcode: UInt8, payload: UnsafeRawBufferPointer) {
        guard state != .closed else { return }
        let n = payload.count
        output.append(0x80 | opcode)
        if n < 126 {
            output.append(0x80 | UInt8(n))
        } else if n < 65_536 {
            output.append(0x80 | 126)
            output.append(UInt8(n >> 8))
            output.append(UInt8(n & 0xFF))
        } else {
            output.append(0x80 | 127)
            for k in stride(from: 56, through: 0, by: -8) { output.append(UInt8((n >> k) & 0xFF)) }
        }
        let m = Self.mask
        output.append(m.0); output.append(m.1); output.append(m.2); output.append(m.3)
        let start = output.count
        output.append(contentsOf: repeatElement(0, count: n))
        output.withUnsafeMutableBytes { out in
            let dst = out.baseAddress! + start
            var i = 0
            while i + 4 <= n {
                dst.storeBytes(of: payload[i] ^ m.0, toByteOffset: i, as: UInt8.self)
                dst.storeBytes(of: payload[i + 1] ^ m.1, toByteOffset: i + 1, as: UInt8.self)
                dst.storeBytes(of: payload[i + 2] ^ m.2, toByteOffset: i + 2, as: UInt8.self)
                dst.storeBytes(of: payload[i + 3] ^ m.3, toByteOffset: i + 3, as: UInt8.self)
                i += 4
            }
            if i < n { dst.storeBytes(of: payload[i] ^ m.0, toByteOffset: i, as: UInt8.self); i += 1 }
            if i < n { dst.storeBytes(of: payload[i] ^ m.1, toByteOffset: i, as: UInt8.self); i += 1 }
            if i < n { dst.storeBytes(of: payload[i] ^ m.2, toByteOffset: i, as: UInt8.self); i += 1 }
        }
    }
}

/// The last counter seen from each of a room's publishers. Slot 0 is stored inline: nearly
/// every room has one publisher, and a separate array would cost a cache miss per message.
struct PublisherCounters {
    private var first: Int32
    private var rest: [Int32]
    let count: Int

    init(slots: Int, initial: Int32) {
        count = slots
        first = initial
        rest = [Int32](repeating: initial, count: max(0, slots - 1))
    }

    subscript(slot: Int) -> Int32 {
        get { slot == 0 ? first : rest[slot - 1] }
        set {
            if slot == 0 { first = newValue } else { rest[slot - 1] = newValue }
        }
    }
}

/// Byte scanning helpers for server frames.
enum Scan {
    /// Offset of `needle` in `count` bytes at `base` (memchr for its first byte, then memcmp).
    @inline(__always)
    static func find(_ base: UnsafeRawPointer, _ count: Int, _ needle: StaticString) -> Int? {
        let length = needle.utf8CodeUnitCount
        let first = Int32(needle.utf8Start[0])
        var i = 0
        while i + length <= count {
            guard let hit = memchr(base + i, first, count - i - length + 1) else { return nil }
            let at = base.distance(to: UnsafeRawPointer(hit))
            if memcmp(base + at, needle.utf8Start, length) == 0 { return at }
            i = at + 1
        }
        return nil
    }

    /// Finds `needle` in `p` from `at`; leaves `at` after the needle and parses the
    /// (non-negative) integer there.
    @inline(__always)
    static func int(_ p: UnsafeRawBufferPointer, after needle: StaticString, from at: inout Int) -> Int? {
        guard at < p.count, let base = p.baseAddress,
              let hit = find(base + at, p.count - at, needle) else { return nil }
        at += hit + needle.utf8CodeUnitCount
        guard at < p.count, p[at] >= 0x30, p[at] <= 0x39 else { return nil }
        return digits(p, &at)
    }

    static func intField(_ p: UnsafeRawBufferPointer, _ needle: StaticString, from: Int) -> Int? {
        var at = from
        return int(p, after: needle, from: &at)
    }

    @inline(__always)
    static func digits(_ p: UnsafeRawBufferPointer, _ at: inout Int) -> Int {
        var v = 0
        while at < p.count {
            let c = p[at]
            guard c >= 0x30, c <= 0x39 else { break }
            v = v &* 10 &+ Int(c &- 0x30)
            at += 1
        }
        return v
    }

    /// `;p=<publisher>;n=<counter>` at `at`, the part of a benchmark text after its `t=<ns>`
    /// (chatgw's JSON envelope and nchan's bare frames carry the same text).
    @inline(__always)
    static func publisherAndCounter(_ p: UnsafeRawBufferPointer, _ at: inout Int) -> (publisher: Int, counter: Int32)? {
        guard at + 3 < p.count, p[at] == UInt8(ascii: ";"), p[at + 1] == UInt8(ascii: "p") else { return nil }
        at += 3
        let publisher = digits(p, &at)
        guard at + 3 < p.count, p[at] == UInt8(ascii: ";"), p[at + 1] == UInt8(ascii: "n") else { return nil }
        at += 3
        return (publisher, Int32(truncatingIfNeeded: digits(p, &at)))
    }

    /// The string after `needle` up to the next quote (error codes, bye reasons).
    static func stringField(_ p: UnsafeRawBufferPointer, _ needle: StaticString) -> String? {
        guard let base = p.baseAddress, let hit = find(base, p.count, needle) else { return nil }
        var at = hit + needle.utf8CodeUnitCount
        let start = at
        while at < p.count && p[at] != UInt8(ascii: "\"") { at += 1 }
        return String(decoding: UnsafeRawBufferPointer(rebasing: p[start..<at]), as: UTF8.self)
    }

    @inline(__always)
    static func appendDecimal(_ out: inout [UInt8], _ value: Int) {
        if value == 0 {
            out.append(0x30)
            return
        }
        var v = value
        var tmp: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes of scratch for up to 20 digits
        var count = 0
        withUnsafeMutableBytes(of: &tmp) { buf in
            while v > 0 {
                buf[count] = UInt8(0x30 + v % 10)
                v /= 10
                count += 1
            }
            var k = count - 1
            while k >= 0 {
                out.append(buf[k])
                k -= 1
            }
        }
    }
}
