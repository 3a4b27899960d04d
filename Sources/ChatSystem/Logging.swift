#if canImport(Glibc)
import Glibc
#endif
import Logging

/// One line per event on stderr, plain
/// (`2026-11-26T22:10:00.123Z info worker1[4242] text key=value`) or JSON
/// (`{"ts":"…","level":"info","role":"worker","slot":1,"pid":4242,"msg":"text","key":"value"}`).
/// Role, slot and pid are on every line so that the interleaved output of the master and
/// its children stays attributable.
public struct ChatLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let role: String
    private let slot: Int?
    private let json: Bool
    private let tag: String

    public init(role: String, slot: Int?, level: Logger.Level, json: Bool) {
        self.role = role
        self.slot = slot
        self.json = json
        self.tag = "\(role)\(slot.map(String.init) ?? "")[\(getpid())]"
        self.logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }.sorted(by: { $0.key < $1.key })
        var line: String
        if json {
            line = "{\"ts\":\"\(Self.timestamp())\",\"level\":\"\(event.level)\",\"role\":\"\(role)\""
            if let slot { line += ",\"slot\":\(slot)" }
            line += ",\"pid\":\(getpid()),\"msg\":\(Self.jsonString("\(event.message)"))"
            for (key, value) in merged where !["ts", "level", "role", "slot", "pid", "msg"].contains(key) {
                line += ",\(Self.jsonString(key)):\(Self.jsonString("\(value)"))"
            }
            line += "}"
        } else {
            line = "\(Self.timestamp()) \(event.level) \(tag) \(event.message)"
            for (key, value) in merged {
                line += " \(key)=\(Self.quoted("\(value)"))"
            }
        }
        line += "\n"
        // One write(2) per line keeps lines from several processes on one stderr whole.
        var bytes = Array(line.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }

    /// Installs the handler process-wide. Call once, first thing in `main`.
    public static func bootstrap(role: String, slot: Int?, level: Logger.Level, json: Bool) {
        LoggingSystem.bootstrap { _ in ChatLogHandler(role: role, slot: slot, level: level, json: json) }
    }

    private static func jsonString(_ value: String) -> String {
        var result = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                result += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: result.unicodeScalars.append(scalar)
            }
        }
        return result + "\""
    }

    private static func quoted(_ value: String) -> String {
        if !value.isEmpty, !value.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" }) { return value }
        return "\"" + value.replacingAll("\"", with: "\\\"") + "\""
    }

    private static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int = 2) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1))-\(pad(parts.tm_mday))T"
            + "\(pad(parts.tm_hour)):\(pad(parts.tm_min)):\(pad(parts.tm_sec)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        var result = ""
        for character in self {
            if character == target { result += replacement } else { result.append(character) }
        }
        return result
    }
}

/// Lets a warning that repeats for as long as an outage lasts (once per request, say)
/// through at most once per interval, and counts the ones held back in between.
public struct LogPace: Sendable {
    private let intervalSeconds: Double
    private var lastLogged: Double?
    private var heldBack = 0

    public init(intervalSeconds: Double) {
        self.intervalSeconds = intervalSeconds
    }

    /// How many were held back since the last line when this one is to be logged (at
    /// `now`, in monotonic seconds); nil when it is held back too.
    public mutating func admit(now: Double) -> Int? {
        if let lastLogged, now - lastLogged < intervalSeconds {
            heldBack += 1
            return nil
        }
        defer { lastLogged = now; heldBack = 0 }
        return heldBack
    }

    /// Forgets the last line: the next one is let through at once.
    public mutating func reset() {
        lastLogged = nil
        heldBack = 0
    }
}

/// The log lines of one outage of something retried every second (a database, say): its
/// first failure at once, then at most one a minute while it lasts, and its end.
public struct OutageLog: Sendable {
    private var pace: LogPace
    /// When the outage began (monotonic seconds); nil while there is none.
    public private(set) var since: Double?

    public init(intervalSeconds: Double = 60) {
        pace = LogPace(intervalSeconds: intervalSeconds)
    }

    /// A failure at `now`: how many failures were not logged since the last line when this
    /// one is to be, else nil.
    public mutating func failed(now: Double) -> Int? {
        if since == nil { since = now }
        return pace.admit(now: now)
    }

    /// A success at `now`: how long the outage it ends lasted, or nil when there was none.
    public mutating func succeeded(now: Double) -> Double? {
        guard let since else { return nil }
        self.since = nil
        pace.reset()
        return now - since
    }
}
