import Foundation

/// How many worker processes the master runs.
public enum WorkerCount: Sendable, Equatable, LosslessStringConvertible {
    /// One worker per CPU core.
    case auto
    /// Exactly this many workers.
    case fixed(Int)

    /// The number of workers to start on a machine with `cores` cores.
    public func resolved(cores: Int) -> Int {
        switch self {
        case .auto: min(max(cores, 1), GatewayConfig.maxWorkers)
        case .fixed(let count): count
        }
    }

    /// Parses "auto" or an integer; the range is checked by `GatewayConfig.validate()`.
    public init?(_ text: String) {
        let text = text.trimmingCharacters(in: .whitespaces)
        if text.lowercased() == "auto" {
            self = .auto
        } else if let count = Int(text) {
            self = .fixed(count)
        } else {
            return nil
        }
    }

    public var description: String {
        switch self {
        case .auto: "auto"
        case .fixed(let count): String(count)
        }
    }
}

// Encoded as it is written in the config file ("auto" or 4) so the JSON hand-off stays readable.
extension WorkerCount: Codable {
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let count = try? container.decode(Int.self) {
            self = .fixed(count)
        } else if try container.decode(String.self) == "auto" {
            self = .auto
        } else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: #"expected "auto" or an integer"#)
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .auto: try container.encode("auto")
        case .fixed(let count): try container.encode(count)
        }
    }
}

/// A TCP address to listen on: an IPv4 literal, an IPv6 literal or "localhost", and a port.
///
/// Written "127.0.0.1:8080", "[::1]:8080" or "localhost:8080"; `description` gives back the
/// same form. `host` holds an IPv6 address without its brackets.
public struct ListenAddress: Sendable, Codable, Equatable, LosslessStringConvertible {
    /// IPv4 literal, IPv6 literal (no brackets) or "localhost".
    public var host: String
    /// 0...65535; 0 lets the kernel pick a port.
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(_ text: String) {
        let host: Substring
        let port: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[close...].hasPrefix("]:") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            port = text[text.index(close, offsetBy: 2)...]
            // Only IPv6 goes in brackets; anything else would not print back the way it was written.
            guard host.contains(":") else { return nil }
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            port = text[text.index(after: colon)...]
            guard !host.contains(":") else { return nil }  // IPv6 must be bracketed
        }
        guard !port.isEmpty, port.count <= 5, port.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        self.init(host: String(host), port: Int(port)!)
        guard isValid else { return nil }
    }

    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Whether the host is an IP literal or "localhost" and the port is in range.
    public var isValid: Bool {
        guard (0...65535).contains(port) else { return false }
        if host == "localhost" { return true }
        var ipv4 = in_addr()
        var ipv6 = in6_addr()
        return inet_pton(AF_INET, host, &ipv4) == 1 || inet_pton(AF_INET6, host, &ipv6) == 1
    }

    static let allowed = #""host:port" with an IPv4 address, an [IPv6] address or localhost and a port from 0 to 65535"#
}

/// Which bus carries room traffic between workers.
public enum BusKind: String, Sendable, Codable, Equatable, CaseIterable {
    /// The embedded relay process on a Unix socket.
    case relay
    /// An external Redis server.
    case redis
}

/// What holds a worker's client sockets.
public enum ClientEngine: String, Sendable, Codable, Equatable, CaseIterable {
    /// SwiftNIO: a channel and its pipeline per connection.
    case nio
    /// chatgw's own epoll loop (ChatEngine): a record per connection; requests it does not
    /// serve itself are handed to SwiftNIO.
    case epoll
}

/// How a worker's NIO thread learns that its epoll loop has events (`server.engine_wakeup`).
public enum EngineWakeup: String, Sendable, Codable, Equatable, CaseIterable {
    /// A one-shot io_uring poll on the loop's epoll descriptor, completed as the thread's
    /// own task work; a worker where io_uring is missing or forbidden uses `thread`.
    case ioUring = "io_uring"
    /// A helper thread that waits on the loop's descriptor and writes to a pipe.
    case thread
}

/// How clients authenticate.
public enum AuthMode: String, Sendable, Codable, Equatable, CaseIterable {
    /// Anyone may connect.
    case none
    /// Clients present a JWT signed with `auth.jwt_secret`.
    case jwt
}

/// Log verbosity. The raw values are those of swift-log's `Logger.Level`, so
/// `Logger.Level(rawValue: config.log.level.rawValue)` converts.
public enum LogLevel: String, Sendable, Codable, Equatable, CaseIterable {
    case trace, debug, info, notice, warning, error, critical
}

/// How log lines are written: `plain` text or one JSON object per line.
public enum LogFormat: String, Sendable, Codable, Equatable, CaseIterable {
    case plain, json
}
