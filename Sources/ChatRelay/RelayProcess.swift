#if canImport(Glibc)
import Glibc
#endif
import ChatBus
import ChatLink
import ChatSystem
import Logging
import NIOCore
import NIOPosix

/// What the relay needs from the config.
public struct RelaySettings: Sendable {
    public var socketPath: String
    public var heartbeatInterval: TimeAmount
    public var limits: RoomBook.Limits
    /// Where the history journal lives; nil keeps history in memory only.
    public var journalDirectory: String?

    public init(socketPath: String, heartbeatInterval: TimeAmount, limits: RoomBook.Limits, journalDirectory: String?) {
        self.journalDirectory = journalDirectory
        self.socketPath = socketPath
        self.heartbeatInterval = heartbeatInterval
        self.limits = limits
    }
}

/// Starts the relay process and never returns.
public enum RelayProcess {
    public static func run(settings: RelaySettings, logger: Logger) -> Never {
        do {
            // Only the gateway's own user may reach the relay socket and the journal.
            umask(0o077)
            let runtime = ChildRuntime(logger: logger)
            let loop = runtime.eventLoop
            let relay = try loop.submit {
                let journal = try settings.journalDirectory.map { directory throws(SystemError) in
                    try HistoryJournal(directory: directory, compactAfter: 100_000)
                }
                return NIOLoopBound(Relay(book: RoomBook(limits: settings.limits), journal: journal, logger: logger), eventLoop: loop)
            }.wait()
            let server = try ServerBootstrap(group: runtime.group)
                .serverChannelInitializer { channel in AcceptPause.install(on: channel, logger: logger) }
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let link = RelayLinkHandler(relay: relay.value, logger: logger)
                        try channel.pipeline.syncOperations.addHandler(RelayLinkReader { link.read($0) })
                        try channel.pipeline.syncOperations.addHandler(link)
                    }
                }
                .bind(unixDomainSocketPath: settings.socketPath, cleanupExistingSocketFile: true)
                .wait()
            // Belt and braces: created under umask 077 below, and 0600 whatever the umask was.
            chmod(settings.socketPath, 0o600)
            try runtime.connect(
                heartbeatInterval: settings.heartbeatInterval,
                commands: ChildCommands(
                    stats: {
                        let relay = relay.value
                        return ChildStats(connections: relay.linkCount, rooms: relay.roomCount, messagesIn: relay.messagesIn, messagesOut: relay.messagesOut)
                    },
                    stop: { _, _, _ in
                        server.close().whenComplete { _ in runtime.finish() }
                    },
                    rooms: { top in relay.value.roomStats(top: top) }
                )
            )
            loop.scheduleRepeatedTask(initialDelay: .seconds(60), delay: .seconds(60)) { _ in relay.value.sweep() }
            logger.info("relay serving", metadata: ["socket": "\(settings.socketPath)"])
            runtime.reportReady()
            runtime.runUntilFinished()
        } catch {
            logger.critical("relay failed to start", metadata: ["error": "\(error)"])
            exit(1)
        }
    }
}
