#if canImport(Glibc)
import Glibc
#endif
import ChatConfig
import Logging
import NIOCore

/// The configured bus for a worker or the archiver: the embedded relay, or Redis.
public enum BusFactory {
    public static func make(config: GatewayConfig, processName: String, eventLoop: any EventLoop, logger: Logger) -> any ArchiverBus {
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let hostname = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let processID = "\(hostname):\(getpid()):\(processName)"
        switch config.bus.kind {
        case .relay:
            return RelayBusClient(socketPath: config.relaySocketPath, workerName: processID, eventLoop: eventLoop, logger: logger)
        case .redis:
            // The URL was validated with the config.
            let endpoint = RedisEndpoint(url: config.bus.redisURL) ?? RedisEndpoint(url: "redis://127.0.0.1:6379/0")!
            return RedisBusClient(
                settings: .init(endpoint: endpoint, historyMessages: config.history.messages,
                                historyMaxAgeMs: config.history.maxAgeSeconds * 1000, workerID: processID),
                eventLoop: eventLoop, logger: logger)
        }
    }
}
