#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ChatArchive
import ChatArchiver
import ChatConfig
import ChatMaster
import ChatRelay
import ChatSystem
import ChatWorker
import Foundation
import Logging
import NIOCore

@main
struct ChatGW: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatgw",
        abstract: "A prefork, multiprocess WebSocket chat gateway.",
        subcommands: [Master.self, Worker.self, Relay.self, Archiver.self],
        defaultSubcommand: Master.self
    )
}

/// Start-up failures a user can cause: one line on stderr, exit 2.
private func failStartup(_ message: String) -> Never {
    FileHandle.standardError.write(Data("chatgw: \(message)\n".utf8))
    exit(2)
}

struct Master: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "master",
        abstract: "Run the master: bind the listener, start the relay and workers, supervise them (the default)."
    )

    @Option(name: .long, help: "Config file (YAML).")
    var config: String?

    @Option(name: .long, help: "Listen address, host:port (server.listen).")
    var listen: String?

    @Option(name: .long, help: "Worker processes, a number or auto (server.workers).")
    var workers: String?

    @Option(name: .long, help: "Directory for the pid file and sockets (server.state_dir).")
    var stateDir: String?

    func run() async throws {
        var overrides: [String: String] = [:]
        overrides["server.listen"] = listen
        overrides["server.workers"] = workers
        overrides["server.state_dir"] = stateDir
        let gateway: GatewayConfig
        do {
            gateway = try await ConfigLoader.load(file: config, environment: ProcessEnvironment.current(), overrides: overrides)
        } catch {
            failStartup(error.description)
        }
        ChatLogHandler.bootstrap(role: "master", slot: nil, level: gateway.log.level.loggerLevel, json: gateway.log.format == .json)
        let logger = Logger(label: "chatgw.master")

        do {
            try FileManager.default.createDirectory(atPath: gateway.server.stateDirectory, withIntermediateDirectories: true)
        } catch {
            failStartup("cannot create state directory \(gateway.server.stateDirectory): \(error.localizedDescription)")
        }
        // A corrupt or unwritable archive stops start-up here, not in a crash-looping child.
        if gateway.archive.kind == .sqlite {
            do {
                try SQLiteArchive.check(path: gateway.archiveSQLitePath)
            } catch {
                failStartup("\(error)")
            }
        }
        let file = config
        let flags = overrides
        let arbiter: Arbiter
        do {
            arbiter = try Arbiter(
                config: gateway, configPath: config, executable: Spawner.currentExecutable(), logger: logger,
                loadConfig: { loadBlocking(file: file, overrides: flags) })
        } catch {
            failStartup(error.description)
        }
        let pidFile = gateway.pidFilePath
        _ = FileManager.default.createFile(atPath: pidFile, contents: Data("\(getpid())\n".utf8))
        let status = arbiter.run()
        try? FileManager.default.removeItem(atPath: pidFile)
        throw ExitCode(status)
    }
}

/// Loads the config again for a reload (the supervision loop is synchronous).
private func loadBlocking(file: String?, overrides: [String: String]) -> Result<GatewayConfig, ConfigError> {
    runBlocking {
        do throws(ConfigError) {
            return .success(try await ConfigLoader.load(file: file, environment: ProcessEnvironment.current(), overrides: overrides))
        } catch {
            return .failure(error)
        }
    }
}

/// What every child reads first: the config the master resolved, from its environment.
private func childConfig() -> GatewayConfig {
    guard let json = ProcessEnvironment.current()[GatewayConfig.environmentJSONVariable] else {
        failStartup("this subcommand is started by the master, not by hand")
    }
    do {
        return try GatewayConfig.decodeFromEnvironmentJSON(json)
    } catch {
        failStartup(error.description)
    }
}

private func heartbeatInterval(_ config: GatewayConfig) -> TimeAmount {
    .milliseconds(Int64(config.supervisor.heartbeatIntervalMs))
}

struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "Internal: one worker process (started by the master).", shouldDisplay: false)

    @Option var slot: Int
    @Option var generation: Int = 1

    func run() throws {
        let config = childConfig()
        ChatLogHandler.bootstrap(role: "worker", slot: slot, level: config.log.level.loggerLevel, json: config.log.format == .json)
        let settings = WorkerSettings(slot: slot, generation: generation, config: config)
        WorkerProcess.run(settings: settings, logger: Logger(label: "chatgw.worker"))
    }
}

struct Relay: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "relay", abstract: "Internal: the relay process (started by the master).", shouldDisplay: false)

    @Option var generation: Int = 1

    func run() throws {
        let config = childConfig()
        ChatLogHandler.bootstrap(role: "relay", slot: nil, level: config.log.level.loggerLevel, json: config.log.format == .json)
        let settings = RelaySettings(
            socketPath: config.relaySocketPath, heartbeatInterval: heartbeatInterval(config),
            limits: RoomBook.Limits(historyMessages: config.history.messages, historyMaxAgeMs: config.history.maxAgeSeconds * 1000),
            journalDirectory: config.history.persist ? config.historyDirectory : nil)
        RelayProcess.run(settings: settings, logger: Logger(label: "chatgw.relay"))
    }
}

struct Archiver: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "archiver", abstract: "Internal: the archiver process (started by the master).", shouldDisplay: false)

    @Option var generation: Int = 1

    func run() throws {
        let config = childConfig()
        ChatLogHandler.bootstrap(role: "archiver", slot: nil, level: config.log.level.loggerLevel, json: config.log.format == .json)
        ArchiverProcess.run(config: config, logger: Logger(label: "chatgw.archiver"))
    }
}

extension LogLevel {
    var loggerLevel: Logger.Level { Logger.Level(rawValue: rawValue) ?? .info }
}
