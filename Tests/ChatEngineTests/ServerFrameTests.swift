import Testing
@testable import ChatEngine

@Suite struct ServerFrameTests {
    /// A whole server frame at each length form: unmasked, FIN, the payload after the
    /// header, and it parses back (control frames up to 125 bytes).
    @Test(arguments: [0, 1, 125, 126, 65_535, 65_536], [Opcode.text, Opcode.binary, Opcode.ping, Opcode.pong])
    func serverFrameParsesBack(n: Int, opcode: UInt8) {
        let payload = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        var frame = [UInt8](repeating: 0xEE, count: n + Frames.maxServerHeaderLength + 1)
        let length = frame.withUnsafeMutableBytes { f in payload.withUnsafeBytes { Frames.writeServerFrame(to: f.baseAddress!, opcode: opcode, payload: $0) } }
        #expect(length == Frames.serverHeaderLength(n) + n)
        #expect(frame[length] == 0xEE)  // nothing written past it
        if opcode & 0x08 != 0 && n > 125 {
            // Written as asked; a control frame that long is invalid, for the peer too.
            #expect(header(Array(frame[..<length])) == .invalid)
            return
        }
        guard case .frame(let h) = header(Array(frame[..<length])) else { Issue.record("unparsed"); return }
        #expect(h.fin && h.opcode == opcode && h.mask == nil && h.payloadLength == n && h.frameLength == length)
        #expect(Array(frame[h.headerLength..<length]) == payload)
    }

    @Test func closeFrame() {
        var f = [UInt8](repeating: 0, count: 5)
        let n = f.withUnsafeMutableBytes { Frames.writeCloseFrame(to: $0.baseAddress!, code: 1009) }
        #expect(n == 4 && f == [0x88, 0x02, 0x03, 0xF1, 0])
    }

    /// Unmasking in two pieces, the second with the key advanced by the first's length,
    /// gives the payload, wherever the cut.
    @Test func maskKeyAdvancedByPieces() {
        let key: [UInt8] = [0x11, 0x22, 0x33, 0x44]
        let k = key.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        let plain = (0..<23).map { UInt8($0 * 7) }
        for cut in 0...plain.count {
            var masked = plain.enumerated().map { $1 ^ key[$0 % 4] }
            masked.withUnsafeMutableBytes { b in
                Frames.unmask(b.baseAddress!, count: cut, key: k)
                Frames.unmask(b.baseAddress! + cut, count: plain.count - cut, key: Frames.maskKey(k, advancedBy: cut))
            }
            #expect(masked == plain, "cut \(cut)")
        }
        #expect(Frames.maskKey(k, advancedBy: 4) == k && Frames.maskKey(k, advancedBy: 1) != k)
    }

    @Test func receivedCloseCodes() {
        let valid = (0...UInt16.max).filter(CloseStatus.isValidReceived)
        #expect(valid.count == 4 + 5 + 2000)
        #expect(valid.first == 1000 && valid.last == 4999)
        for code: UInt16 in [1004, 1005, 1006, 1012, 1015, 2999, 5000] { #expect(!CloseStatus.isValidReceived(code), "\(code)") }
    }
}
