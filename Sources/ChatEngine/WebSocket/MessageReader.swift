import Glibc

/// Limits on what a client may send (RFC 6455 leaves them to the server).
public struct MessageRules: Sendable {
    /// The largest message, fragments joined: past it the connection fails with 1009.
    public var maxMessageBytes: Int
    /// The most frames one message may come in: past it the connection fails with 1009.
    public var maxFragments: Int
    /// An unfragmented data frame at most this long (header included) is waited for until
    /// it is whole in the caller's buffer, then unmasked and reported where it lies; a
    /// longer one is taken as it arrives, into a message buffer, so that it never has to
    /// fit the caller's buffer. At most the size of that buffer. 0 takes every data frame
    /// as it arrives (UTF-8 is then checked as each piece arrives, at the price of a copy
    /// for a frame split between reads).
    public var wholeFrameLimit: Int

    public init(maxMessageBytes: Int, maxFragments: Int, wholeFrameLimit: Int = 256 * 1024) {
        self.maxMessageBytes = maxMessageBytes
        self.maxFragments = maxFragments
        self.wholeFrameLimit = wholeFrameLimit
    }
}

/// What a client's frames amount to. Payloads are unmasked and live only during the
/// handler's call: in the caller's buffer, or in the message buffer, which is freed when
/// the call returns. In both places the `Frames.serverHeaderLength(payload.count)` bytes
/// just before a payload are free to overwrite (the client's header was 4 bytes longer;
/// the message buffer keeps 16 bytes there), so the server frame (echo, fan-out, pong) can
/// be written where the payload lies, its header just before it.
public enum MessageEvent {
    /// A whole text message, valid UTF-8.
    case text(UnsafeMutableRawBufferPointer)
    case binary(UnsafeMutableRawBufferPointer)
    /// To be answered with a pong carrying the same payload.
    case ping(UnsafeMutableRawBufferPointer)
    case pong(UnsafeMutableRawBufferPointer)
    /// The client's close frame: answer with a close frame carrying `code` (RFC 6455
    /// §5.5.1: the client's own code if valid, 1000 for an empty close, 1002 for a
    /// malformed one) and close the connection. Nothing after it is read.
    case close(code: UInt16)
    /// A protocol violation: send a close frame with `code` and close the connection
    /// without waiting for the client's (RFC 6455 §7.1.7). Nothing after it is read.
    case fail(code: UInt16)
}

public protocol MessageHandler {
    /// One event; false stops `read`, which then returns the bytes up to and including
    /// the frame that made the event (the return value is ignored for close and fail).
    mutating func handle(_ event: MessageEvent) -> Bool
}

/// One connection's message reader: a pointer, nil while no message is in progress.
///
/// An unfragmented frame that is whole in the caller's buffer costs nothing: it is
/// unmasked and checked there and reported as a pointer into it. The frames of a
/// fragmented message (and an unfragmented frame longer than `wholeFrameLimit`) are taken
/// as they arrive, part frames included, into one malloc'd block, the record below
/// followed by the message bytes, grown geometrically as bytes arrive (never on a length
/// a header merely claims) and freed as soon as the message has been reported, or on
/// close, fail, or `release()`. A value, not an object: one copy owns the block.
public struct MessageReader {
    var partial: UnsafeMutablePointer<PartialMessage>? = nil

    public init() {}

    /// No message in progress: the reader holds no memory.
    public var isIdle: Bool { partial == nil }

    /// The bytes of the message buffer (0 while idle).
    public var heldBytes: Int { partial.map { PartialMessage.payloadOffset + $0.pointee.capacity } ?? 0 }

    /// Frees the message buffer, if any: the connection is gone.
    public mutating func release() {
        guard let m = partial else { return }
        Glibc.free(m)
        partial = nil
    }

    /// Consumes the client frames in `p[0..<count]` and reports what they amount to;
    /// returns the bytes consumed. What is left (at most one frame, begun) is to be given
    /// again, with more bytes after it, on the next call. Unmasks in place. After close or
    /// fail, returns `count` and is idle.
    public mutating func read<H: MessageHandler>(_ p: UnsafeMutableRawPointer, count: Int, rules: MessageRules, handler: inout H) -> Int {
        var at = 0
        // Inside a data frame's payload that goes into the message buffer.
        var inFrame = partial.map { $0.pointee.frameRemaining > 0 } ?? false
        while true {
            if inFrame {
                let n = min(count - at, partial!.pointee.frameRemaining)
                guard append(p + at, n, rules) else { return fail(CloseStatus.invalidPayload, &handler, count) }
                at += n
                let m = partial!  // append may have moved it
                if m.pointee.frameRemaining > 0 { return at }
                inFrame = false
                if m.pointee.lastFrame {
                    guard m.pointee.opcode == Opcode.binary || m.pointee.utf8.isComplete else {
                        return fail(CloseStatus.invalidPayload, &handler, count)
                    }
                    guard deliver(&handler) else { return at }
                }
                continue
            }
            guard at < count else { return at }
            let f = p + at
            let available = count - at
            let h: FrameHeader
            switch Frames.parseHeader(f, available) {
            case .incomplete: return at
            case .invalid: return fail(CloseStatus.protocolError, &handler, count)
            case .frame(let header): h = header
            }
            guard let key = h.mask else { return fail(CloseStatus.protocolError, &handler, count) }
            switch h.opcode {
            case Opcode.close, Opcode.ping, Opcode.pong:
                // At most 131 bytes (parseHeader checked): always waited for.
                guard available - h.headerLength >= h.payloadLength else { return at }
                let payload = UnsafeMutableRawBufferPointer(start: f + h.headerLength, count: h.payloadLength)
                Frames.unmask(payload.baseAddress!, count: payload.count, key: key)
                at += h.frameLength
                if h.opcode == Opcode.close {
                    release()
                    _ = handler.handle(.close(code: Self.echoCode(closePayload: UnsafeRawBufferPointer(payload))))
                    return count
                }
                guard handler.handle(h.opcode == Opcode.ping ? .ping(payload) : .pong(payload)) else { return at }
            case Opcode.text, Opcode.binary:
                guard partial == nil else { return fail(CloseStatus.protocolError, &handler, count) }
                guard h.payloadLength <= rules.maxMessageBytes else { return fail(CloseStatus.tooBig, &handler, count) }
                // Lengths compared without adding to the payload's: it may be up to 2^63 - 1
                // if the caller allows messages that large.
                if h.fin && available - h.headerLength >= h.payloadLength {
                    // The common case: whole, unfragmented, here.
                    let payload = UnsafeMutableRawBufferPointer(start: f + h.headerLength, count: h.payloadLength)
                    Frames.unmask(payload.baseAddress!, count: payload.count, key: key)
                    at += h.frameLength
                    if h.opcode == Opcode.binary {
                        guard handler.handle(.binary(payload)) else { return at }
                    } else {
                        guard UTF8Validation.isValid(payload.baseAddress!, count: payload.count) else {
                            return fail(CloseStatus.invalidPayload, &handler, count)
                        }
                        guard handler.handle(.text(payload)) else { return at }
                    }
                    continue
                }
                if h.fin && h.payloadLength <= rules.wholeFrameLimit - h.headerLength { return at }
                begin(h, key: key, firstPiece: min(available - h.headerLength, h.payloadLength), rules)
                at += h.headerLength
                inFrame = true
            case Opcode.continuation:
                guard let m = partial else { return fail(CloseStatus.protocolError, &handler, count) }
                guard m.pointee.fragments < rules.maxFragments,
                      h.payloadLength <= rules.maxMessageBytes - m.pointee.count else {
                    return fail(CloseStatus.tooBig, &handler, count)
                }
                m.pointee.fragments += 1
                m.pointee.frameRemaining = h.payloadLength
                m.pointee.key = key
                m.pointee.lastFrame = h.fin
                at += h.headerLength
                inFrame = true
            default:
                return fail(CloseStatus.protocolError, &handler, count)  // reserved opcodes
            }
        }
    }

    /// The code to answer a client's close frame with (RFC 6455 §5.5.1, §7.4): the
    /// client's own if it may be received and the reason is UTF-8, 1000 if the frame has
    /// no payload, otherwise 1002 (a 1-byte payload, a code that may not be sent, a reason
    /// that is not UTF-8; the NIO path's `WebSocketHandler.validatedCloseCode` answers the
    /// same).
    public static func echoCode(closePayload payload: UnsafeRawBufferPointer) -> UInt16 {
        guard payload.count > 0 else { return CloseStatus.normal }
        guard payload.count >= 2 else { return CloseStatus.protocolError }
        let code = UInt16(payload[0]) << 8 | UInt16(payload[1])
        guard CloseStatus.isValidReceived(code), UTF8Validation.isValid(UnsafeRawBufferPointer(rebasing: payload[2...])) else {
            return CloseStatus.protocolError
        }
        return code
    }

    // MARK: the message buffer

    /// A message's first frame, of which `firstPiece` payload bytes are here: the buffer
    /// is made for them (and no more than the message can reach).
    mutating func begin(_ h: FrameHeader, key: UInt32, firstPiece: Int, _ rules: MessageRules) {
        let limit = h.fin ? h.payloadLength : rules.maxMessageBytes
        let capacity = PartialMessage.grownCapacity(0, needed: firstPiece, limit: limit)
        let m = Self.allocate(capacity)
        m.initialize(to: PartialMessage(capacity: capacity, frameRemaining: h.payloadLength, key: key, opcode: h.opcode, lastFrame: h.fin))
        partial = m
    }

    /// `n` more bytes of the current frame's payload, from the caller's buffer into the
    /// message buffer, unmasked; text is checked as it arrives. False if not UTF-8.
    mutating func append(_ from: UnsafeRawPointer, _ n: Int, _ rules: MessageRules) -> Bool {
        var m = partial!
        let needed = m.pointee.count + n
        if needed > m.pointee.capacity {
            let limit = m.pointee.lastFrame ? m.pointee.count + m.pointee.frameRemaining : rules.maxMessageBytes
            let capacity = PartialMessage.grownCapacity(m.pointee.capacity, needed: needed, limit: limit)
            guard let grown = realloc(m, PartialMessage.payloadOffset + capacity) else { preconditionFailure("realloc \(capacity)") }
            m = grown.bindMemory(to: PartialMessage.self, capacity: 1)
            m.pointee.capacity = capacity
            partial = m
        }
        let to = UnsafeMutableRawPointer(m) + PartialMessage.payloadOffset + m.pointee.count
        to.copyMemory(from: from, byteCount: n)
        Frames.unmask(to, count: n, key: m.pointee.key)
        m.pointee.key = Frames.maskKey(m.pointee.key, advancedBy: n)
        m.pointee.count = needed
        m.pointee.frameRemaining -= n
        return m.pointee.opcode == Opcode.binary || m.pointee.utf8.validate(to, count: n)
    }

    /// The message is whole: reported, then the buffer freed.
    mutating func deliver<H: MessageHandler>(_ handler: inout H) -> Bool {
        let m = partial!
        let payload = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(m) + PartialMessage.payloadOffset, count: m.pointee.count)
        let go = handler.handle(m.pointee.opcode == Opcode.text ? .text(payload) : .binary(payload))
        release()
        return go
    }

    mutating func fail<H: MessageHandler>(_ code: UInt16, _ handler: inout H, _ count: Int) -> Int {
        release()
        _ = handler.handle(.fail(code: code))
        return count
    }

    static func allocate(_ capacity: Int) -> UnsafeMutablePointer<PartialMessage> {
        guard let p = malloc(PartialMessage.payloadOffset + capacity) else { preconditionFailure("malloc \(capacity)") }
        return p.bindMemory(to: PartialMessage.self, capacity: 1)
    }
}

/// The head of a message buffer: the message so far and the frame being taken. The
/// message bytes follow at `payloadOffset`, leaving room for a server header before them.
struct PartialMessage {
    /// Message bytes held.
    var count = 0
    /// Message bytes the block has room for.
    var capacity: Int
    /// Payload bytes of the current frame not yet arrived.
    var frameRemaining: Int
    /// Frames so far, the current one included.
    var fragments = 1
    /// The current frame's mask key, turned to the next byte to arrive.
    var key: UInt32
    var utf8 = UTF8Validator()
    /// Text or binary: the first frame's opcode.
    var opcode: UInt8
    /// The current frame has FIN set.
    var lastFrame: Bool

    /// 48 bytes of record, then 16 free for a server header (at most 10).
    static let payloadOffset = 64

    /// Twice the capacity, at least `needed` and 1 KiB, at most `limit` (the size the
    /// message can still reach, at least `needed`).
    static func grownCapacity(_ capacity: Int, needed: Int, limit: Int) -> Int {
        min(max(needed, capacity * 2, 1024), limit)
    }
}
