#if canImport(Glibc)
import Glibc
#endif
import ChatLink
import ChatSystem
import Logging
import NIOCore
import NIOPosix

/// What the relay needs from the config.
public struct RelaySettings: Sendable {
    public var socketPath: String
    public var heartbeatInterval: TimeAmount

    public init(socketPath: String, heartbeatInterval: TimeAmount) {
        self.socketPath = socketPath
        self.heartbeatInterval = heartbeatInterval
    }
}

/// Starts the relay process and never returns.
public enum RelayProcess {
    public static func run(settings: RelaySettings, logger: Logger) -> Never {
        do {
            let runtime = ChildRuntime(logger: logger)
            let server = try ServerBootstrap(group: runtime.group)
                .childChannelInitializer { channel in channel.eventLoop.makeSucceededVoidFuture() }
                .bind(unixDomainSocketPath: settings.socketPath, cleanupExistingSocketFile: true)
                .wait()
            // Only the gateway's own processes (same user) may speak to the relay.
            chmod(settings.socketPath, 0o600)
            try runtime.connect(
                heartbeatInterval: settings.heartbeatInterval,
                stats: { ChildStats() },
                onStop: { _, _ in
                    server.close().whenComplete { _ in runtime.finish() }
                }
            )
            logger.info("relay serving", metadata: ["socket": "\(settings.socketPath)"])
            runtime.reportReady()
            runtime.runUntilFinished()
        } catch {
            logger.critical("relay failed to start", metadata: ["error": "\(error)"])
            exit(1)
        }
    }
}
