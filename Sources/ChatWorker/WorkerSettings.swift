import ChatConfig
import ChatLink

/// What a worker is: its slot and generation, and the config the master resolved.
public struct WorkerSettings: Sendable {
    public var slot: Int
    public var generation: Int
    public var config: GatewayConfig

    public init(slot: Int, generation: Int, config: GatewayConfig) {
        self.slot = slot
        self.generation = generation
        self.config = config
    }

    var limits: GatewayConfig.Limits { config.limits }
    var heartbeatSeconds: Int { config.server.heartbeatSeconds }
}

/// Figures the worker reports to the master (cumulative).
struct WorkerCounters {
    var messagesIn = 0
    var messagesOut = 0
    var joins = 0
    /// Join requests sent to the bus: a tick's joins of one room from one resume point go as one.
    var busJoins = 0
    /// Replayed messages written; live ones are counted by the room table.
    var deliveries = 0
    var bytesOut = 0
    var slowConsumerDisconnects = 0
    var floodDisconnects = 0
    var busLatencyBuckets = [Int](repeating: 0, count: BusLatency.bucketBounds.count + 1)
    var busLatencySumSeconds = 0.0

    mutating func observeBusLatency(seconds: Double) {
        busLatencyBuckets[BusLatency.bucket(for: seconds)] += 1
        busLatencySumSeconds += seconds
    }
}
