import Testing
@testable import ChatEngine

/// A client frame as a browser would send it: FIN, masked with `key`.
func clientFrame(opcode: UInt8, payload: [UInt8], key: [UInt8] = [0x37, 0xFA, 0x21, 0x3D], fin: Bool = true) -> [UInt8] {
    var f: [UInt8] = [(fin ? 0x80 : 0) | opcode]
    let n = payload.count
    if n < 126 { f.append(0x80 | UInt8(n)) }
    else if n < 65_536 { f += [0x80 | 126, UInt8(n >> 8), UInt8(n & 0xFF)] }
    else { f.append(0x80 | 127); for s in stride(from: 56, through: 0, by: -8) { f.append(UInt8(truncatingIfNeeded: n >> s)) } }
    f += key
    for (i, b) in payload.enumerated() { f.append(b ^ key[i % 4]) }
    return f
}

func header(_ bytes: [UInt8]) -> FrameParse {
    bytes.withUnsafeBytes { Frames.parseHeader($0.baseAddress!, $0.count) }
}

@Suite struct FrameTests {
    @Test(arguments: [0, 1, 7, 125, 126, 127, 65_535, 65_536])
    func maskedClientFrameBecomesTheServerFrame(n: Int) throws {
        let payload = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        var frame = clientFrame(opcode: Opcode.text, payload: payload)
        guard case .frame(let h) = header(frame) else { Issue.record("no header"); return }
        #expect(h.fin && h.opcode == Opcode.text && h.payloadLength == n && h.mask != nil)
        #expect(h.headerLength == (n < 126 ? 6 : n < 65_536 ? 8 : 14))
        #expect(h.frameLength == frame.count)
        let (offset, length) = frame.withUnsafeMutableBytes { Frames.reframeInPlace($0.baseAddress!, h) }
        let server = Array(frame[offset..<(offset + length)])
        // The server frame: unmasked, the shortest length form, and the payload as sent.
        let expectedHead: [UInt8] = n < 126 ? [0x81, UInt8(n)]
            : n < 65_536 ? [0x81, 126, UInt8(n >> 8), UInt8(n & 0xFF)]
            : [0x81, 127, 0, 0, 0, 0, 0, UInt8(n >> 16), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)]
        #expect(Array(server.prefix(expectedHead.count)) == expectedHead)
        #expect(Array(server.dropFirst(expectedHead.count)) == payload)
        // And it parses back as one whole unmasked frame.
        guard case .frame(let back) = header(server) else { Issue.record("server frame unparsed"); return }
        #expect(back.mask == nil && back.payloadLength == n && back.frameLength == server.count)
    }

    @Test func incompleteHeaders() {
        let long = clientFrame(opcode: Opcode.binary, payload: [UInt8](repeating: 1, count: 65_536))
        for cut in 0..<14 { #expect(header(Array(long.prefix(cut))) == .incomplete, "cut \(cut)") }
        guard case .frame = header(Array(long.prefix(14))) else { Issue.record("14 bytes are the header"); return }
        let mid = clientFrame(opcode: Opcode.text, payload: [UInt8](repeating: 1, count: 126))
        for cut in 0..<8 { #expect(header(Array(mid.prefix(cut))) == .incomplete, "cut \(cut)") }
    }

    @Test func invalidFrames() {
        #expect(header([0xC1, 0x80, 0, 0, 0, 0]) == .invalid)  // RSV1
        #expect(header([0x09, 0x80, 0, 0, 0, 0]) == .invalid)  // fragmented ping
        #expect(header(clientFrame(opcode: Opcode.ping, payload: [UInt8](repeating: 0, count: 126))) == .invalid)
        #expect(header([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]) == .invalid)  // 64-bit length, top bit
    }

    @Test func unmaskAtEveryLengthAndAlignment() {
        let key: [UInt8] = [0xA1, 0xB2, 0xC3, 0xD4]
        let k = key.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        for n in 0..<40 {
            let plain = (0..<n).map { UInt8($0) }
            var masked = [UInt8](repeating: 0xEE, count: 3) + plain.enumerated().map { $1 ^ key[$0 % 4] }
            masked.withUnsafeMutableBytes { Frames.unmask($0.baseAddress! + 3, count: n, key: k) }
            #expect(Array(masked.dropFirst(3)) == plain, "n \(n)")
        }
    }

    @Test func closeAndControlFrames() {
        guard case .frame(let h) = header(clientFrame(opcode: Opcode.close, payload: [0x03, 0xE8])) else { Issue.record("close"); return }
        #expect(h.opcode == Opcode.close && h.payloadLength == 2)
        guard case .frame(let p) = header(clientFrame(opcode: Opcode.ping, payload: [1, 2, 3])) else { Issue.record("ping"); return }
        #expect(p.opcode == Opcode.ping && p.payloadLength == 3)
    }
}
