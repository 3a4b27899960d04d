import Glibc

/// The HTTP/1.1 upgrade request, parsed in place: every field is a range of offsets into the
/// bytes the caller read, nothing is copied and nothing is allocated.
public struct UpgradeRequest: Equatable, Sendable {
    /// The target's path (before `?`) and query (after it; empty if none).
    public var path: Range<Int>
    public var query: Range<Int>
    public var key: Range<Int>
    /// The bytes of the request head, its blank line included: whatever follows is frames.
    public var headLength: Int
    /// The `Origin` and `Authorization` values (empty if none) and the last
    /// `Sec-WebSocket-Protocol` value.
    public var origin: Range<Int> = 0..<0
    public var authorization: Range<Int> = 0..<0
    public var subprotocols: Range<Int> = 0..<0
}

public enum UpgradeRefusal: UInt8, Sendable {
    case malformed, notGet, notHTTP11, notUpgrade, noKey, badVersion, tooLarge

    /// The HTTP answer, whole: status line, headers and an empty body.
    public var response: StaticString {
        switch self {
        case .badVersion: "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        case .tooLarge: "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        case .notGet: "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        default: "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
    }
}

public enum UpgradeParse: Equatable, Sendable {
    case incomplete
    case refused(UpgradeRefusal)
    case request(UpgradeRequest)
}

public enum UpgradeParser {
    /// The largest request head accepted.
    public static let maxHead = 8192

    public static func parse(_ b: UnsafeRawBufferPointer) -> UpgradeParse {
        let n = b.count
        guard let end = headEnd(b) else {
            return n >= maxHead ? .refused(.tooLarge) : .incomplete
        }
        if end > maxHead { return .refused(.tooLarge) }
        // Request line: GET SP target SP HTTP/1.1 CRLF
        guard end >= 16, b[0] == 0x47, b[1] == 0x45, b[2] == 0x54, b[3] == 0x20 else {
            return .refused(.notGet)
        }
        var i = 4
        let targetStart = i
        var question = -1
        while i < end && b[i] != 0x20 && b[i] != 0x0D {
            if b[i] == 0x3F && question < 0 { question = i }
            i += 1
        }
        guard i < end, b[i] == 0x20, i > targetStart, b[targetStart] == 0x2F else { return .refused(.malformed) }
        let targetEnd = i
        i += 1
        guard i + 10 <= end, matches(b, i, "HTTP/1.1\r\n") else { return .refused(.notHTTP11) }
        i += 10
        var upgrade = false, connection = false, version = false, sawVersion = false
        var key = 0..<0, origin = 0..<0, authorization = 0..<0, subprotocols = 0..<0
        // Headers: Name ":" OWS value OWS CRLF, until the blank line at `end - 4`.
        while i < end - 2 {
            let lineEnd = find(0x0D, in: b, from: i, to: end)
            let colon = find(0x3A, in: b, from: i, to: lineEnd)
            guard colon < lineEnd, colon > i else { return .refused(.malformed) }
            var vs = colon + 1, ve = lineEnd
            while vs < ve && (b[vs] == 0x20 || b[vs] == 0x09) { vs += 1 }
            while ve > vs && (b[ve - 1] == 0x20 || b[ve - 1] == 0x09) { ve -= 1 }
            let nameLength = colon - i
            switch nameLength {
            case 7 where equalsLower(b, i, colon, "upgrade"):
                upgrade = equalsLower(b, vs, ve, "websocket")
            case 10 where equalsLower(b, i, colon, "connection"):
                connection = connection || hasToken(b, vs, ve, "upgrade")
            case 6 where equalsLower(b, i, colon, "origin"):
                origin = vs..<ve
            case 13 where equalsLower(b, i, colon, "authorization"):
                authorization = vs..<ve
            case 22 where equalsLower(b, i, colon, "sec-websocket-protocol"):
                subprotocols = vs..<ve
            case 17 where equalsLower(b, i, colon, "sec-websocket-key"):
                key = vs..<ve
            case 21 where equalsLower(b, i, colon, "sec-websocket-version"):
                sawVersion = true
                version = ve - vs == 2 && b[vs] == 0x31 && b[vs + 1] == 0x33
            default:
                break
            }
            i = lineEnd + 2
        }
        guard upgrade, connection else { return .refused(.notUpgrade) }
        guard sawVersion, version else { return .refused(.badVersion) }
        guard key.count == 24 else { return .refused(.noKey) }
        let path = targetStart..<(question >= 0 ? question : targetEnd)
        let query = question >= 0 ? (question + 1)..<targetEnd : targetEnd..<targetEnd
        return .request(UpgradeRequest(path: path, query: query, key: key, headLength: end, origin: origin, authorization: authorization, subprotocols: subprotocols))
    }

    /// The offset just past the first CRLFCRLF, or nil.
    @inline(__always)
    static func headEnd(_ b: UnsafeRawBufferPointer) -> Int? {
        let n = b.count
        var i = 3
        while i < n {
            if b[i] == 0x0A {
                if b[i - 1] == 0x0D && b[i - 2] == 0x0A && b[i - 3] == 0x0D { return i + 1 }
                i += 1
            } else if b[i] == 0x0D || b[i] == 0x0A {
                i += 1
            } else {
                i += 4  // no CRLFCRLF can end before i + 4 if b[i] is neither CR nor LF
            }
        }
        return nil
    }

    /// The offset of the first `byte` in `b[s..<e]`, or `e`. memchr: a header line is tens of
    /// bytes, which a byte loop walked twice (its end, then its colon), and a handshake's
    /// parse was its largest piece of user space.
    @inline(__always)
    static func find(_ byte: UInt8, in b: UnsafeRawBufferPointer, from s: Int, to e: Int) -> Int {
        guard s < e, let found = memchr(b.baseAddress! + s, Int32(byte), e - s) else { return e }
        return UnsafeRawPointer(found) - b.baseAddress!
    }

    /// The value of `name` in the query `b[q]` (no percent-decoding), or nil.
    public static func queryValue(_ b: UnsafeRawBufferPointer, _ q: Range<Int>, _ name: StaticString) -> Range<Int>? {
        var i = q.lowerBound
        while i < q.upperBound {
            var amp = i
            while amp < q.upperBound && b[amp] != 0x26 { amp += 1 }
            var eq = i
            while eq < amp && b[eq] != 0x3D { eq += 1 }
            if eq < amp && eq - i == name.utf8CodeUnitCount && matches(b, i, name) { return (eq + 1)..<amp }
            i = amp + 1
        }
        return nil
    }

    /// `b` is exactly `s` (a path, say).
    @inline(__always)
    public static func equals(_ b: UnsafeRawBufferPointer, _ s: StaticString) -> Bool {
        b.count == s.utf8CodeUnitCount && matches(b, 0, s)
    }

    @inline(__always)
    static func matches(_ b: UnsafeRawBufferPointer, _ at: Int, _ s: StaticString) -> Bool {
        let p = s.utf8Start
        let n = s.utf8CodeUnitCount
        guard at + n <= b.count else { return false }
        for k in 0..<n where b[at + k] != p[k] { return false }
        return true
    }

    /// `b[s..<e]` equals `lower` (ASCII letters compared without case).
    @inline(__always)
    static func equalsLower(_ b: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ lower: StaticString) -> Bool {
        let n = lower.utf8CodeUnitCount
        guard e - s == n else { return false }
        let p = lower.utf8Start
        for k in 0..<n {
            var c = b[s + k]
            if c >= 0x41 && c <= 0x5A { c |= 0x20 }
            if c != p[k] { return false }
        }
        return true
    }

    /// A comma-separated list `b[s..<e]` holds `lower` as one of its tokens.
    public static func hasToken(_ b: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ lower: StaticString) -> Bool {
        var i = s
        while i < e {
            var comma = i
            while comma < e && b[comma] != 0x2C { comma += 1 }
            var ts = i, te = comma
            while ts < te && (b[ts] == 0x20 || b[ts] == 0x09) { ts += 1 }
            while te > ts && (b[te - 1] == 0x20 || b[te - 1] == 0x09) { te -= 1 }
            if equalsLower(b, ts, te, lower) { return true }
            i = comma + 1
        }
        return false
    }
}
