import ChatConfig
import ChatSystem

/// Everything the supervisor needs to know, resolved from one config generation.
public struct MasterSettings: Sendable, Equatable {
    public var config: GatewayConfig
    public var executable: String
    public var workerCount: Int
    public var restart: RestartPolicy.Settings
    public var drainTimeout: Double
    public var heartbeatTimeout: Double
    /// A child that has not said `ready` by then is killed and restarted.
    public var startTimeout: Double

    public init(config: GatewayConfig, executable: String) {
        self.config = config
        self.executable = executable
        workerCount = config.server.workers.resolved(cores: ProcessControl.processorCount())
        let supervisor = config.supervisor
        restart = RestartPolicy.Settings(
            initialDelay: Double(supervisor.restartBackoffInitialMs) / 1000,
            maximumDelay: Double(supervisor.restartBackoffMaxMs) / 1000,
            stableAfter: Double(supervisor.restartResetAfterSeconds),
            crashLoopAfter: supervisor.crashLoopRestarts)
        drainTimeout = supervisor.drainTimeoutSeconds
        heartbeatTimeout = supervisor.heartbeatTimeoutSeconds
        startTimeout = max(10, supervisor.heartbeatTimeoutSeconds)
    }

    var host: String { config.server.listen.host }
    var port: Int { config.server.listen.port }
    var backlog: Int32 { Int32(config.server.backlog) }

    /// Whether the archiver must be replaced to apply `other`.
    func archiverDiffers(from other: MasterSettings) -> Bool {
        config.archive != other.config.archive || !config.bus.sameEndpoint(as: other.config.bus)
            || config.archiveSQLitePath != other.config.archiveSQLitePath
    }

    /// Whether the relay must be replaced to apply `other` (its own settings changed).
    func relayDiffers(from other: MasterSettings) -> Bool {
        !config.bus.sameEndpoint(as: other.config.bus) || config.history != other.config.history
            || config.relaySocketPath != other.config.relaySocketPath
    }
}
