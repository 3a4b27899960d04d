/// Where Redis is (`bus.redis_url`): `redis://[:password@]host[:port][/db]` or `unix:///path/to/socket[?db=N]`.
public struct RedisEndpoint: Sendable, Equatable {
    public enum Address: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var address: Address
    public var password: String?
    public var database: Int

    public init?(url: String) {
        if url.hasPrefix("unix://") {
            let rest = url.dropFirst("unix://".count)
            let parts = rest.split(separator: "?", maxSplits: 1)
            guard let path = parts.first, path.hasPrefix("/") else { return nil }
            address = .unix(path: String(path))
            database = parts.count == 2 ? (parts[1].split(separator: "=").last.flatMap { Int($0) } ?? 0) : 0
            password = nil
            return
        }
        guard url.hasPrefix("redis://") else { return nil }
        var rest = Substring(url.dropFirst("redis://".count))
        if let at = rest.lastIndex(of: "@") {
            let credentials = rest[..<at]
            password = String(credentials.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).last ?? "")
            rest = rest[rest.index(after: at)...]
        } else {
            password = nil
        }
        let hostAndPath = rest.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        database = hostAndPath.count == 2 && !hostAndPath[1].isEmpty ? (Int(hostAndPath[1]) ?? -1) : 0
        guard database >= 0, let hostPort = hostAndPath.first, !hostPort.isEmpty else { return nil }
        if let colon = hostPort.lastIndex(of: ":"), !hostPort.hasSuffix("]") {
            guard let port = Int(hostPort[hostPort.index(after: colon)...]), (1...65535).contains(port) else { return nil }
            address = .tcp(host: String(hostPort[..<colon]).trimmingBrackets, port: port)
        } else {
            address = .tcp(host: String(hostPort).trimmingBrackets, port: 6379)
        }
    }
}

extension String {
    fileprivate var trimmingBrackets: String {
        hasPrefix("[") && hasSuffix("]") ? String(dropFirst().dropLast()) : self
    }
}
