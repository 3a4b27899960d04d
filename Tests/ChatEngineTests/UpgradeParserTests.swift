import Testing
@testable import ChatEngine

func parse(_ s: String) -> UpgradeParse {
    Array(s.utf8).withUnsafeBytes { UpgradeParser.parse($0) }
}

let good = "GET /sub?room=r1&x=2 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

@Suite struct UpgradeParserTests {
    @Test func completeRequest() throws {
        guard case .request(let r) = parse(good) else { Issue.record("not parsed: \(parse(good))"); return }
        let bytes = Array(good.utf8)
        #expect(String(decoding: bytes[r.path], as: UTF8.self) == "/sub")
        #expect(String(decoding: bytes[r.query], as: UTF8.self) == "room=r1&x=2")
        #expect(String(decoding: bytes[r.key], as: UTF8.self) == "dGhlIHNhbXBsZSBub25jZQ==")
        #expect(r.headLength == bytes.count)
        let room = bytes.withUnsafeBytes { UpgradeParser.queryValue($0, r.query, "room") }
        #expect(room.map { String(decoding: bytes[$0], as: UTF8.self) } == "r1")
        let x = bytes.withUnsafeBytes { UpgradeParser.queryValue($0, r.query, "x") }
        #expect(x.map { String(decoding: bytes[$0], as: UTF8.self) } == "2")
        #expect(bytes.withUnsafeBytes { UpgradeParser.queryValue($0, r.query, "roo") } == nil)
    }

    @Test func bytesAfterTheHeadAreNotPartOfIt() {
        guard case .request(let r) = parse(good + "\u{81}\u{85}") else { Issue.record("not parsed"); return }
        #expect(r.headLength == good.utf8.count)
    }

    @Test func everyPrefixIsIncomplete() {
        let bytes = Array(good.utf8)
        for cut in 0..<bytes.count {
            let r = bytes[..<cut].withUnsafeBytes { UpgradeParser.parse($0) }
            #expect(r == .incomplete, "cut at \(cut)")
        }
    }

    @Test func noQuery() {
        guard case .request(let r) = parse(good.replacing("/sub?room=r1&x=2", with: "/sub")) else { Issue.record("not parsed"); return }
        #expect(r.query.isEmpty)
        #expect(r.path == 4..<8)
    }

    @Test func refusals() {
        #expect(parse(good.replacing("GET", with: "POST")) == .refused(.notGet))
        #expect(parse(good.replacing("HTTP/1.1\r\nHost", with: "HTTP/1.0\r\nHost")) == .refused(.notHTTP11))
        #expect(parse(good.replacing("Upgrade: WebSocket\r\n", with: "")) == .refused(.notUpgrade))
        #expect(parse(good.replacing("keep-alive, Upgrade", with: "keep-alive")) == .refused(.notUpgrade))
        #expect(parse(good.replacing("Version: 13", with: "Version: 8")) == .refused(.badVersion))
        #expect(parse(good.replacing("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", with: "")) == .refused(.noKey))
        #expect(parse(good.replacing("Host: h", with: "Host h")) == .refused(.malformed))
        #expect(parse(good.replacing("/sub?", with: "sub?")) == .refused(.malformed))
        #expect(parse("GET /" + String(repeating: "a", count: 9000)) == .refused(.tooLarge))
    }
}

@Suite struct AcceptValueTests {
    func sha1Hex(_ s: String) -> String {
        var out = [UInt8](repeating: 0, count: 20)
        Array(s.utf8).withUnsafeBytes { b in out.withUnsafeMutableBytes { SHA1.digest(b, into: $0.baseAddress!) } }
        return out.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    @Test func sha1KnownAnswers() {
        #expect(sha1Hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(sha1Hex("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(sha1Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") == "84983e441c3bd26ebaae4aa1f95129e5e54670f1")
        #expect(sha1Hex(String(repeating: "a", count: 1000)) == "291e9a6c66994949b57ba5e650361e98fc36b1ba")
    }

    /// Lengths around the block edges: the padding and the length fit in the last block or
    /// need one more (hashlib's answers).
    @Test(arguments: [
        (55, "c1c8bbdc22796e28c0e15163d20899b65621d65a"), (56, "c2db330f6083854c99d4b5bfb6e8f29f201be699"),
        (63, "03f09f5b158a7a8cdad920bddc29b81c18a551f5"), (64, "0098ba824b5c16427bd7a1122a5a442a25ec644d"),
        (119, "ee971065aaa017e0632a8ca6c77bb3bf8b1dfc56"), (120, "f34c1488385346a55709ba056ddd08280dd4c6d6"),
        (128, "ad5b3fdbcb526778c2839d2f151ea753995e26a0"),
    ])
    func sha1AtBlockEdges(_ length: Int, _ hex: String) {
        #expect(sha1Hex(String(repeating: "a", count: length)) == hex)
    }

    /// The SHA instructions and the portable rounds agree on every length from 0 to 300
    /// (whole blocks, tails of one and two blocks), on bytes of every value.
    @Test func sha1HardwareAndPortableAgree() {
        var generator = SystemRandomNumberGenerator()
        for length in 0...300 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            var portable = [UInt8](repeating: 0, count: 20), chosen = portable
            bytes.withUnsafeBytes { b in
                portable.withUnsafeMutableBytes { SHA1.digest(b, into: $0.baseAddress!, hardware: false) }
                chosen.withUnsafeMutableBytes { SHA1.digest(b, into: $0.baseAddress!) }
            }
            #expect(chosen == portable, "length \(length), hardware \(SHA1.hardware)")
        }
    }

    /// RFC 6455 §1.3's example.
    @Test func rfc6455Example() {
        var out = [UInt8](repeating: 0, count: 28)
        let n = Array("dGhlIHNhbXBsZSBub25jZQ==".utf8).withUnsafeBytes { k in
            out.withUnsafeMutableBytes { WebSocketAccept.write(key: k, to: $0.baseAddress!) }
        }
        #expect(n == 28)
        #expect(String(decoding: out, as: UTF8.self) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    }

    @Test func base64Padding() {
        func b64(_ s: String) -> String {
            var out = [UInt8](repeating: 0, count: 16)
            let n = Array(s.utf8).withUnsafeBytes { b in out.withUnsafeMutableBytes { WebSocketAccept.base64(b, to: $0.baseAddress!) } }
            return String(decoding: out[..<n], as: UTF8.self)
        }
        #expect(b64("f") == "Zg==")
        #expect(b64("fo") == "Zm8=")
        #expect(b64("foo") == "Zm9v")
        #expect(b64("foob") == "Zm9vYg==")
    }
}

@Suite struct UpgradeHeaderCaptureTests {
    @Test func originAuthorizationAndSubprotocolsAreFound() {
        let request = good.replacing("Host: h\r\n", with: "Host: h\r\nORIGIN: https://a.example\r\nAuthorization:  Bearer t.k.n \r\nSec-WebSocket-Protocol: x, chatgw.v1\r\n")
        guard case .request(let r) = parse(request) else { Issue.record("not parsed"); return }
        let bytes = Array(request.utf8)
        #expect(String(decoding: bytes[r.origin], as: UTF8.self) == "https://a.example")
        #expect(String(decoding: bytes[r.authorization], as: UTF8.self) == "Bearer t.k.n")
        #expect(String(decoding: bytes[r.subprotocols], as: UTF8.self) == "x, chatgw.v1")
        #expect(bytes.withUnsafeBytes { UpgradeParser.hasToken($0, r.subprotocols.lowerBound, r.subprotocols.upperBound, "chatgw.v1") })
    }

    @Test func absentHeadersAreEmpty() {
        guard case .request(let r) = parse(good) else { Issue.record("not parsed"); return }
        #expect(r.origin.isEmpty && r.authorization.isEmpty && r.subprotocols.isEmpty)
    }
}
