import Testing
@testable import ChatEngine

/// An event, its payload copied out (the reader's payloads live only during the call).
enum Got: Equatable, CustomStringConvertible {
    case text([UInt8]), binary([UInt8]), ping([UInt8]), pong([UInt8]), close(UInt16), fail(UInt16)

    var description: String {
        switch self {
        case .text(let b): "text(\(b.count))"
        case .binary(let b): "binary(\(b.count))"
        case .ping(let b): "ping(\(b))"
        case .pong(let b): "pong(\(b))"
        case .close(let c): "close(\(c))"
        case .fail(let c): "fail(\(c))"
        }
    }
}

struct Recorder: MessageHandler {
    var got: [Got] = []
    /// Where each text or binary payload lay.
    var payloadStarts: [UnsafeMutableRawPointer] = []
    /// Events after which to stop.
    var stopAfter = Int.max

    mutating func handle(_ event: MessageEvent) -> Bool {
        switch event {
        case .text(let b): got.append(.text(Array(b))); payloadStarts.append(b.baseAddress!)
        case .binary(let b): got.append(.binary(Array(b))); payloadStarts.append(b.baseAddress!)
        case .ping(let b): got.append(.ping(Array(b)))
        case .pong(let b): got.append(.pong(Array(b)))
        case .close(let code): got.append(.close(code))
        case .fail(let code): got.append(.fail(code))
        }
        return got.count < stopAfter
    }
}

/// A client frame with every header bit chosen: RSV bits (0-7), masked or not.
func rawFrame(opcode: UInt8, payload: [UInt8], fin: Bool = true, rsv: UInt8 = 0, masked: Bool = true) -> [UInt8] {
    var f = clientFrame(opcode: opcode, payload: payload, fin: fin)
    f[0] |= rsv << 4
    guard !masked else { return f }
    let head = f.count - payload.count - 4
    f[1] &= 0x7F
    return Array(f[..<(head)]) + payload
}

let rules = MessageRules(maxMessageBytes: 1 << 20, maxFragments: 100)

/// A reader fed as the engine's loop feeds it: reads of at most `chunk` bytes land after
/// what the last call left in a buffer of `bufferSize` bytes.
struct Pump {
    var reader = MessageReader()
    var recorder = Recorder()
    var rules = ChatEngineTests.rules
    let buffer: UnsafeMutableRawPointer
    let bufferSize: Int
    var have = 0
    /// What each call returned.
    var consumed: [Int] = []

    init(rules: MessageRules = ChatEngineTests.rules, bufferSize: Int = 256 * 1024) {
        self.rules = rules
        self.bufferSize = bufferSize
        buffer = .allocate(byteCount: bufferSize, alignment: 16)
    }

    /// Feeds `bytes` in reads of at most `chunk`; false if the buffer filled up with a
    /// part frame the reader would not take.
    @discardableResult
    mutating func feed(_ bytes: [UInt8], chunk: Int = .max) -> Bool {
        var from = 0
        while from < bytes.count {
            let n = min(chunk, bytes.count - from, bufferSize - have)
            if n == 0 { return false }
            bytes[from..<(from + n)].withUnsafeBytes { (buffer + have).copyMemory(from: $0.baseAddress!, byteCount: n) }
            from += n
            have += n
            let used = reader.read(buffer, count: have, rules: rules, handler: &recorder)
            consumed.append(used)
            #expect(used <= have)
            if used > 0 && used < have { (buffer).copyMemory(from: buffer + used, byteCount: have - used) }
            have -= used
        }
        return true
    }

    func free() {
        buffer.deallocate()
        var r = reader
        r.release()
    }
}

/// `bytes` fed in one call; the events and what the call returned.
func readOnce(_ bytes: [UInt8], rules: MessageRules = rules) -> (got: [Got], consumed: Int) {
    var reader = MessageReader()
    var recorder = Recorder()
    var copy = bytes
    let used = copy.withUnsafeMutableBytes { reader.read($0.baseAddress!, count: $0.count, rules: rules, handler: &recorder) }
    reader.release()
    return (recorder.got, used)
}

let hello = Array("Hello, κόσμε".utf8)

@Suite struct MessageReaderTests {
    // MARK: whole frames

    @Test func unfragmentedTextIsUnmaskedWhereItLies() {
        var frame = clientFrame(opcode: Opcode.text, payload: hello)
        var reader = MessageReader()
        var recorder = Recorder()
        let used = frame.withUnsafeMutableBytes { b in
            let used = reader.read(b.baseAddress!, count: b.count, rules: rules, handler: &recorder)
            // Zero copy: the payload reported is the frame's, unmasked in place.
            #expect(recorder.payloadStarts == [b.baseAddress! + 6])
            return used
        }
        #expect(used == frame.count)
        #expect(recorder.got == [.text(hello)])
        #expect(Array(frame[6...]) == hello)
        #expect(reader.isIdle && reader.heldBytes == 0)
    }

    @Test func severalFramesInOneBuffer() {
        let frames = clientFrame(opcode: Opcode.text, payload: hello)
            + clientFrame(opcode: Opcode.binary, payload: [0, 1, 2, 0xFF])
            + clientFrame(opcode: Opcode.ping, payload: [7, 8])
            + clientFrame(opcode: Opcode.pong, payload: [])
            + clientFrame(opcode: Opcode.text, payload: [])
            + clientFrame(opcode: Opcode.binary, payload: [UInt8](repeating: 9, count: 70_000))
        let r = readOnce(frames)
        #expect(r.got == [.text(hello), .binary([0, 1, 2, 0xFF]), .ping([7, 8]), .pong([]), .text([]), .binary([UInt8](repeating: 9, count: 70_000))])
        #expect(r.consumed == frames.count)
    }

    /// Cut anywhere, the first call takes the whole frames before the cut only, and the
    /// second (the rest after what was left) the others.
    @Test func frameSplitAcrossTwoCalls() {
        let first = clientFrame(opcode: Opcode.ping, payload: [1])
        let second = clientFrame(opcode: Opcode.text, payload: hello)
        let stream = first + second
        for cut in 1..<stream.count {
            var pump = Pump()
            pump.feed(Array(stream[..<cut]))
            #expect(pump.consumed == [cut < first.count ? 0 : first.count], "cut \(cut)")
            #expect(pump.reader.isIdle)
            pump.feed(Array(stream[cut...]))
            #expect(pump.recorder.got == [.ping([1]), .text(hello)], "cut \(cut)")
            #expect(pump.have == 0 && pump.reader.isIdle)
            pump.free()
        }
    }

    /// With `wholeFrameLimit` 0 a split data frame is taken as it arrives instead, into the
    /// message buffer, and reported once whole.
    @Test func splitFrameTakenAsItArrivesWithoutAWholeFrameLimit() {
        let frame = clientFrame(opcode: Opcode.text, payload: hello)
        for cut in 1..<frame.count {
            var pump = Pump(rules: MessageRules(maxMessageBytes: 1 << 20, maxFragments: 100, wholeFrameLimit: 0))
            pump.feed(Array(frame[..<cut]))
            #expect(pump.consumed == [cut < 6 ? 0 : cut], "cut \(cut)")
            #expect(pump.reader.isIdle == (cut < 6) && pump.recorder.got.isEmpty)
            pump.feed(Array(frame[cut...]))
            #expect(pump.recorder.got == [.text(hello)], "cut \(cut)")
            #expect(pump.reader.isIdle && pump.have == 0)
            pump.free()
        }
    }

    /// A frame longer than the caller's buffer (Autobahn 9.1.6: 16 MiB in one frame) is
    /// taken as it arrives; the message buffer grows with the bytes, not with the length
    /// the header announces.
    @Test func frameLargerThanTheBuffer() {
        let n = 4 << 20
        let payload = (0..<n).map { UInt8(0x20 + $0 % 90) }
        let frame = clientFrame(opcode: Opcode.text, payload: payload)
        var pump = Pump(rules: MessageRules(maxMessageBytes: 16 << 20, maxFragments: 1, wholeFrameLimit: 64 * 1024), bufferSize: 64 * 1024)
        let fitted = pump.feed(Array(frame.prefix(1000)))
        #expect(fitted)
        #expect(pump.consumed == [1000])
        #expect(pump.reader.heldBytes <= 64 + 1024)
        let fittedRest = pump.feed(Array(frame.dropFirst(1000)), chunk: 48 * 1024)
        #expect(fittedRest)
        #expect(pump.recorder.got == [.text(payload)])
        #expect(pump.reader.isIdle)
        pump.free()
    }

    @Test func handlerStopsTheReader() {
        let a = clientFrame(opcode: Opcode.ping, payload: [1])
        let frames = a + clientFrame(opcode: Opcode.text, payload: hello)
        var reader = MessageReader()
        var recorder = Recorder(stopAfter: 1)
        var copy = frames
        let used = copy.withUnsafeMutableBytes { reader.read($0.baseAddress!, count: $0.count, rules: rules, handler: &recorder) }
        #expect(used == a.count && recorder.got == [.ping([1])])
    }

    // MARK: fragments

    @Test func textInThreeFragments() {
        // "κόσμε" cut inside code points: each fragment alone is not UTF-8.
        let text = Array("κόσμε and more".utf8)
        let frames = clientFrame(opcode: Opcode.text, payload: Array(text[..<3]), fin: false)
            + clientFrame(opcode: Opcode.continuation, payload: Array(text[3..<8]), fin: false)
            + clientFrame(opcode: Opcode.continuation, payload: Array(text[8...]))
        var pump = Pump()
        pump.feed(Array(frames[..<(frames.count - 5)]))
        #expect(pump.recorder.got.isEmpty && !pump.reader.isIdle && pump.reader.heldBytes > 0)
        pump.feed(Array(frames.suffix(5)))
        #expect(pump.recorder.got == [.text(text)])
        #expect(pump.reader.isIdle && pump.reader.heldBytes == 0)
        pump.free()
    }

    @Test func binaryFragmentsWithControlFramesBetween() {
        let frames = clientFrame(opcode: Opcode.binary, payload: [1, 2], fin: false)
            + clientFrame(opcode: Opcode.ping, payload: [0xAA])
            + clientFrame(opcode: Opcode.continuation, payload: [], fin: false)
            + clientFrame(opcode: Opcode.pong, payload: [0xBB])
            + clientFrame(opcode: Opcode.continuation, payload: [3])
            + clientFrame(opcode: Opcode.text, payload: hello)
        let r = readOnce(frames)
        #expect(r.got == [.ping([0xAA]), .pong([0xBB]), .binary([1, 2, 3]), .text(hello)])
        #expect(r.consumed == frames.count)
    }

    @Test func pingBetweenFragmentsIsReportedAtOnce() {
        var pump = Pump()
        pump.feed(clientFrame(opcode: Opcode.text, payload: Array("ab".utf8), fin: false) + clientFrame(opcode: Opcode.ping, payload: [5]))
        #expect(pump.recorder.got == [.ping([5])])
        pump.feed(clientFrame(opcode: Opcode.continuation, payload: Array("cd".utf8)))
        #expect(pump.recorder.got == [.ping([5]), .text(Array("abcd".utf8))])
        pump.free()
    }

    /// Autobahn 9.x: 16 MiB in 64-byte fragments, fed through a 256 KiB buffer in reads of
    /// 64 KiB, with 2- and 3-byte code points cut by fragment and read boundaries.
    @Test func sixteenMebibytesIn64ByteFragments() {
        let n = 16 << 20
        let unit = Array("aé€z".utf8)  // 7 bytes: never in step with 64
        var payload = [UInt8](repeating: 0, count: n)
        for i in 0..<n { payload[i] = unit[i % unit.count] }
        let whole = n / unit.count * unit.count
        payload.removeLast(n - whole)
        var stream: [UInt8] = []
        stream.reserveCapacity(whole / 64 * 70 + 70)
        var at = 0
        while at < whole {
            let end = min(at + 64, whole)
            stream += clientFrame(opcode: at == 0 ? Opcode.text : Opcode.continuation, payload: Array(payload[at..<end]), fin: end == whole)
            at = end
        }
        var pump = Pump(rules: MessageRules(maxMessageBytes: 16 << 20, maxFragments: 1 << 20))
        let fitted = pump.feed(stream, chunk: 64 * 1024)
        #expect(fitted)
        #expect(pump.recorder.got.count == 1)
        #expect(pump.recorder.got.first == .text(payload))
        #expect(pump.reader.isIdle && pump.have == 0)
        pump.free()
    }

    /// A message buffer is freed by `release` (the connection ends mid-message) and by a
    /// close in the middle of a message.
    @Test func messageBufferFreedOnReleaseAndClose() {
        var reader = MessageReader()
        var recorder = Recorder()
        var first = clientFrame(opcode: Opcode.text, payload: hello, fin: false)
        _ = first.withUnsafeMutableBytes { reader.read($0.baseAddress!, count: $0.count, rules: rules, handler: &recorder) }
        #expect(!reader.isIdle)
        reader.release()
        #expect(reader.isIdle && reader.heldBytes == 0)
        reader.release()  // twice is fine

        let r = readOnce(clientFrame(opcode: Opcode.binary, payload: [1], fin: false) + clientFrame(opcode: Opcode.close, payload: [0x03, 0xE8])
            + clientFrame(opcode: Opcode.continuation, payload: [2]))
        #expect(r.got == [.close(1000)])  // nothing after the close is read
    }

    // MARK: the rules

    @Test(arguments: [1, 2, 3, 4, 5, 6, 7] as [UInt8])
    func reservedBitsFail(rsv: UInt8) {
        #expect(readOnce(rawFrame(opcode: Opcode.text, payload: hello, rsv: rsv)).got == [.fail(1002)])
        #expect(readOnce(rawFrame(opcode: Opcode.ping, payload: [], rsv: rsv)).got == [.fail(1002)])
        // Also on a continuation, after the message has begun.
        let r = readOnce(clientFrame(opcode: Opcode.text, payload: [0x61], fin: false) + rawFrame(opcode: Opcode.continuation, payload: [0x62], rsv: rsv))
        #expect(r.got == [.fail(1002)])
    }

    @Test func unmaskedFramesFail() {
        for opcode in [Opcode.text, Opcode.binary, Opcode.ping, Opcode.pong, Opcode.close] {
            let r = readOnce(rawFrame(opcode: opcode, payload: [0x61], masked: false))
            #expect(r.got == [.fail(1002)], "opcode \(opcode)")
        }
        // The frames before it are reported.
        let r = readOnce(clientFrame(opcode: Opcode.ping, payload: []) + rawFrame(opcode: Opcode.text, payload: hello, masked: false))
        #expect(r.got == [.ping([]), .fail(1002)])
    }

    @Test(arguments: [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] as [UInt8])
    func reservedOpcodesFail(opcode: UInt8) {
        let frames = clientFrame(opcode: opcode, payload: [1, 2]) + clientFrame(opcode: Opcode.text, payload: hello)
        let r = readOnce(frames)
        #expect(r.got == [.fail(1002)])  // and the text after it is not read
        #expect(r.consumed == frames.count)
    }

    @Test func controlFramesMustBeWholeAndShort() {
        for opcode in [Opcode.ping, Opcode.pong, Opcode.close] {
            #expect(readOnce(clientFrame(opcode: opcode, payload: [1], fin: false)).got == [.fail(1002)], "fragmented \(opcode)")
            #expect(readOnce(clientFrame(opcode: opcode, payload: [UInt8](repeating: 0x61, count: 126))).got == [.fail(1002)], "126 bytes \(opcode)")
            // Only the header is needed to know.
            #expect(readOnce(Array(clientFrame(opcode: opcode, payload: [UInt8](repeating: 0x61, count: 126)).prefix(4))).got == [.fail(1002)])
        }
        let longest = [UInt8](repeating: 0x61, count: 125)
        #expect(readOnce(clientFrame(opcode: Opcode.ping, payload: longest)).got == [.ping(longest)])
    }

    @Test func continuationWithoutAMessageFails() {
        #expect(readOnce(clientFrame(opcode: Opcode.continuation, payload: hello)).got == [.fail(1002)])
        #expect(readOnce(clientFrame(opcode: Opcode.continuation, payload: hello, fin: false)).got == [.fail(1002)])
        // After a message has ended, too.
        let r = readOnce(clientFrame(opcode: Opcode.text, payload: [0x61], fin: false) + clientFrame(opcode: Opcode.continuation, payload: [0x62])
            + clientFrame(opcode: Opcode.continuation, payload: [0x63]))
        #expect(r.got == [.text([0x61, 0x62]), .fail(1002)])
    }

    @Test func newMessageInsideAFragmentedOneFails() {
        for opcode in [Opcode.text, Opcode.binary] {
            for fin in [true, false] {
                let r = readOnce(clientFrame(opcode: Opcode.binary, payload: [1], fin: false) + clientFrame(opcode: opcode, payload: [0x61], fin: fin))
                #expect(r.got == [.fail(1002)], "opcode \(opcode) fin \(fin)")
            }
        }
    }

    @Test func invalidUTF8Fails() {
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: [0x61, 0xED, 0xA0, 0x80])).got == [.fail(1007)])
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: [0xC0, 0x80])).got == [.fail(1007)])
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: [0x61, 0xF0, 0x9F])).got == [.fail(1007)])  // cut off
        // Binary is not text.
        #expect(readOnce(clientFrame(opcode: Opcode.binary, payload: [0xC0, 0x80])).got == [.binary([0xC0, 0x80])])
    }

    /// Autobahn 6.4.1: the fragment that makes the text invalid fails the connection at
    /// once; the fragments before it, although they end inside a code point, do not.
    @Test func invalidUTF8DetectedAtTheFragmentThatMakesIt() {
        var pump = Pump()
        pump.feed(clientFrame(opcode: Opcode.text, payload: Array("κόσμε".utf8) + [0xF4], fin: false))
        #expect(pump.recorder.got.isEmpty)
        pump.feed(clientFrame(opcode: Opcode.continuation, payload: [0x8F], fin: false))  // F4 8F: still fine
        #expect(pump.recorder.got.isEmpty)
        pump.feed(clientFrame(opcode: Opcode.continuation, payload: [0xBF, 0xC0], fin: false))  // C0 can start nothing
        #expect(pump.recorder.got == [.fail(1007)])
        #expect(pump.reader.isIdle)
        pump.free()
    }

    /// Autobahn 6.4.2/6.4.4: a fragment is checked as its bytes arrive, so the bad byte
    /// fails the connection before the rest of its fragment has come.
    @Test func invalidUTF8DetectedInsideAFragment() {
        var pump = Pump()
        pump.feed(clientFrame(opcode: Opcode.text, payload: Array("κόσμε".utf8), fin: false))
        let second = clientFrame(opcode: Opcode.continuation, payload: [0x61, 0xF4, 0x90] + [UInt8](repeating: 0x61, count: 20))
        pump.feed(Array(second.prefix(8)))  // header (6), 'a', F4
        #expect(pump.recorder.got.isEmpty && pump.consumed.last == 8)
        pump.feed([second[8]])  // F4 90: past U+10FFFF
        #expect(pump.recorder.got == [.fail(1007)])
        pump.free()
    }

    /// Autobahn 6.4.3/6.4.4: one frame, chopped. With `wholeFrameLimit` 0 the frame is
    /// taken as it arrives, so the chop with the bad byte fails; by default a frame that
    /// fits is waited for, and fails once whole.
    @Test func invalidUTF8InAChoppedFrame() {
        let frame = clientFrame(opcode: Opcode.text, payload: Array("κόσμε".utf8) + [0xF4, 0x90, 0x80, 0x80] + Array("edited".utf8))
        let chops = [Array(frame[..<17]), Array(frame[17..<18]), Array(frame[18...])]  // 6 + 10 + F4, then 90
        var eager = Pump(rules: MessageRules(maxMessageBytes: 1 << 20, maxFragments: 100, wholeFrameLimit: 0))
        eager.feed(chops[0])
        #expect(eager.recorder.got.isEmpty)
        eager.feed(chops[1])
        #expect(eager.recorder.got == [.fail(1007)])
        eager.free()
        var waiting = Pump()
        waiting.feed(chops[0])
        waiting.feed(chops[1])
        #expect(waiting.recorder.got.isEmpty && waiting.consumed == [0, 0])
        waiting.feed(chops[2])
        #expect(waiting.recorder.got == [.fail(1007)])
        waiting.free()
    }

    @Test func truncatedCodePointAtTheEndOfAFragmentedMessage() {
        let r = readOnce(clientFrame(opcode: Opcode.text, payload: [0x61, 0xE2], fin: false) + clientFrame(opcode: Opcode.continuation, payload: [0x82]))
        #expect(r.got == [.fail(1007)])
        let ok = readOnce(clientFrame(opcode: Opcode.text, payload: [0x61, 0xE2], fin: false) + clientFrame(opcode: Opcode.continuation, payload: [0x82, 0xAC]))
        #expect(ok.got == [.text([0x61, 0xE2, 0x82, 0xAC])])
    }

    @Test func messageSizeLimit() {
        let small = MessageRules(maxMessageBytes: 100, maxFragments: 100)
        let exactly = [UInt8](repeating: 0x61, count: 100)
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: exactly), rules: small).got == [.text(exactly)])
        #expect(readOnce(clientFrame(opcode: Opcode.binary, payload: exactly + [0]), rules: small).got == [.fail(1009)])
        // Known from the header alone, before the payload arrives.
        let big = clientFrame(opcode: Opcode.binary, payload: [UInt8](repeating: 0, count: 70_000))
        #expect(readOnce(Array(big.prefix(14)), rules: small).got == [.fail(1009)])
        // Fragments add up.
        let split = clientFrame(opcode: Opcode.text, payload: Array(exactly[..<60]), fin: false)
        #expect(readOnce(split + clientFrame(opcode: Opcode.continuation, payload: Array(exactly[60...])), rules: small).got == [.text(exactly)])
        #expect(readOnce(split + clientFrame(opcode: Opcode.continuation, payload: Array(exactly[59...])), rules: small).got == [.fail(1009)])
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: exactly + [0x61], fin: false), rules: small).got == [.fail(1009)])
    }

    @Test func fragmentCountLimit() {
        let three = MessageRules(maxMessageBytes: 100, maxFragments: 3)
        func message(_ frames: Int) -> [UInt8] {
            (0..<frames).flatMap { i in clientFrame(opcode: i == 0 ? Opcode.binary : Opcode.continuation, payload: [UInt8(i)], fin: i == frames - 1) }
        }
        #expect(readOnce(message(3), rules: three).got == [.binary([0, 1, 2])])
        #expect(readOnce(message(4), rules: three).got == [.fail(1009)])
        // Control frames between are not fragments.
        let withPings = clientFrame(opcode: Opcode.binary, payload: [0], fin: false) + clientFrame(opcode: Opcode.ping, payload: [])
            + clientFrame(opcode: Opcode.continuation, payload: [1], fin: false) + clientFrame(opcode: Opcode.ping, payload: [])
            + clientFrame(opcode: Opcode.continuation, payload: [2])
        #expect(readOnce(withPings, rules: three).got == [.ping([]), .ping([]), .binary([0, 1, 2])])
    }

    @Test func sixtyFourBitLengthWithTheTopBitFails() {
        let frame: [UInt8] = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]
        #expect(readOnce(frame).got == [.fail(1002)])
        // The largest length a header can hold fails on the size rule, without overflow.
        let largest: [UInt8] = [0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4]
        #expect(readOnce(largest).got == [.fail(1009)])
        #expect(readOnce(clientFrame(opcode: Opcode.text, payload: [0x61], fin: false) + [0x80] + largest.dropFirst()).got == [.fail(1009)])
    }

    // MARK: close

    @Test func closeCodes() {
        func close(_ payload: [UInt8]) -> [Got] { readOnce(clientFrame(opcode: Opcode.close, payload: payload)).got }
        #expect(close([]) == [.close(1000)])
        #expect(close([0x03]) == [.close(1002)])  // 1 byte
        for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] as [UInt16] {
            #expect(close([UInt8(code >> 8), UInt8(code & 0xFF)]) == [.close(code)], "\(code)")
            #expect(close([UInt8(code >> 8), UInt8(code & 0xFF)] + Array("bye κόσμε".utf8)) == [.close(code)], "\(code) with a reason")
        }
        for code in [0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 5000, 65535] as [UInt16] {
            #expect(close([UInt8(code >> 8), UInt8(code & 0xFF)]) == [.close(1002)], "\(code)")
        }
        // A valid code with a reason that is not UTF-8.
        #expect(close([0x03, 0xE8, 0x61, 0xCE]) == [.close(1002)])
        #expect(close([0x03, 0xE8, 0xED, 0xA0, 0x80]) == [.close(1002)])
        #expect(close([0x03, 0xE8] + [UInt8](repeating: 0x61, count: 123)) == [.close(1000)])  // the longest reason
    }

    @Test func closeEndsTheRead() {
        let frames = clientFrame(opcode: Opcode.ping, payload: [1]) + clientFrame(opcode: Opcode.close, payload: [0x0F, 0xA0])
            + clientFrame(opcode: Opcode.text, payload: hello)
        let r = readOnce(frames)
        #expect(r.got == [.ping([1]), .close(4000)])
        #expect(r.consumed == frames.count)
    }

    // MARK: server frames

    /// The `serverHeaderLength` bytes before a reported payload may take the server header:
    /// the echo is built where the message lies, whether it was in place or joined.
    @Test func echoFramedWhereThePayloadLies() {
        struct Echo: MessageHandler {
            var frames: [[UInt8]] = []
            mutating func handle(_ event: MessageEvent) -> Bool {
                let opcode: UInt8, payload: UnsafeMutableRawBufferPointer
                switch event {
                case .text(let b): (opcode, payload) = (Opcode.text, b)
                case .binary(let b): (opcode, payload) = (Opcode.binary, b)
                case .ping(let b): (opcode, payload) = (Opcode.pong, b)
                default: return false
                }
                let head = Frames.serverHeaderLength(payload.count)
                let start = payload.baseAddress! - head
                Frames.writeServerHeader(to: start, opcode: opcode, payloadLength: payload.count)
                frames.append(Array(UnsafeRawBufferPointer(start: start, count: head + payload.count)))
                return true
            }
        }
        for n in [0, 125, 126, 65_535, 65_536] {
            let payload = (0..<n).map { UInt8(truncatingIfNeeded: $0) }
            var stream = clientFrame(opcode: Opcode.binary, payload: payload)
                + clientFrame(opcode: Opcode.ping, payload: Array(payload.prefix(125)))
                + clientFrame(opcode: Opcode.binary, payload: Array(payload.prefix(n / 2)), fin: false)
                + clientFrame(opcode: Opcode.continuation, payload: Array(payload.dropFirst(n / 2)))
            var reader = MessageReader()
            var echo = Echo()
            _ = stream.withUnsafeMutableBytes { reader.read($0.baseAddress!, count: $0.count, rules: rules, handler: &echo) }
            let server = { (opcode: UInt8, p: [UInt8]) -> [UInt8] in
                var f = [UInt8](repeating: 0, count: p.count + 10)
                let k = f.withUnsafeMutableBytes { b in p.withUnsafeBytes { Frames.writeServerFrame(to: b.baseAddress!, opcode: opcode, payload: $0) } }
                return Array(f.prefix(k))
            }
            #expect(echo.frames == [server(Opcode.binary, payload), server(Opcode.pong, Array(payload.prefix(125))), server(Opcode.binary, payload)], "n \(n)")
            let expected = server(Opcode.binary, payload)
            guard case .frame(let h) = header(expected) else { Issue.record("unparsed"); continue }
            #expect(h.mask == nil && h.fin && h.payloadLength == n && h.frameLength == expected.count)
        }
    }

    @Test func readerStateIsOnePointer() {
        #expect(MemoryLayout<MessageReader>.size == 8)
        #expect(MemoryLayout<PartialMessage>.stride <= PartialMessage.payloadOffset - Frames.maxServerHeaderLength)
    }
}
