#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ChatAuth
import ChatConfig
import ChatControl
import Foundation

/// Inspect and control a running chatgw master through its control socket.
@main
struct ChatCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatctl",
        abstract: "Inspect and control a running chatgw master.",
        discussion: """
            The control socket is found from --socket, else $CHATGW_CONTROL_SOCKET, else the config \
            given with --config (control.socket, server.state_dir), else run/chatgw.ctl.
            """,
        subcommands: [Status.self, Workers.self, Rooms.self, Reload.self, Stop.self, Scale.self, Kick.self, Token.self]
    )
}

struct Connection: ParsableArguments {
    @Option(help: "The master's control socket.")
    var socket: String?

    @Option(help: "The chatgw config file, to find the control socket.")
    var config: String?

    @Flag(help: "Print the master's answer as JSON.")
    var json = false

    func socketPath() async -> String {
        if let socket { return socket }
        let environment = ProcessInfo.processInfo.environment
        if let path = environment["CHATGW_CONTROL_SOCKET"], !path.isEmpty { return path }
        if let config, let loaded = try? await ConfigLoader.load(file: config, environment: environment, overrides: [:]) {
            return loaded.controlSocketPath
        }
        return GatewayConfig().controlSocketPath
    }

    /// Sends one request; prints the JSON answer with --json. Exits 1 on any failure.
    func send(_ request: ControlRequest) async throws -> ControlResponse {
        let path = await socketPath()
        let response: ControlResponse
        do {
            response = try ControlClient.exchange(request, socketPath: path)
        } catch {
            printError("cannot reach the master at \(path): \(error) (is chatgw running?)")
            throw ExitCode(1)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(response), as: UTF8.self))
        }
        guard response.ok else {
            if !json { printError(response.error ?? "the master refused the request") }
            throw ExitCode(1)
        }
        return response
    }
}

extension Connection {
    /// Sends a command whose answer is a message; prints it (or `fallback`) unless --json.
    func perform(_ request: ControlRequest, fallback: String) async throws {
        let response = try await send(request)
        if !json { print(response.message ?? fallback) }
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data("chatctl: \(message)\n".utf8))
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The master and every child: state, uptime, restarts, load.")
    @OptionGroup var connection: Connection

    func run() async throws {
        let response = try await connection.send(ControlRequest(command: .status))
        guard !connection.json, let status = response.status else { return }
        print(Table.statusHeader(status))
        print("")
        print(Table.children(status.children))
    }
}

struct Workers: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The children as a table.")
    @OptionGroup var connection: Connection

    func run() async throws {
        let response = try await connection.send(ControlRequest(command: .workers))
        guard !connection.json, let status = response.status else { return }
        print(Table.children(status.children))
    }
}

struct Rooms: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The busiest rooms: members, seq, messages per second.")
    @OptionGroup var connection: Connection
    @Option(help: "How many rooms.") var top = 20

    func run() async throws {
        let response = try await connection.send(ControlRequest(command: .rooms, top: top))
        guard !connection.json else { return }
        print(Table.rooms(response.rooms ?? []))
    }
}

struct Reload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Re-read the config and roll the workers (as SIGHUP).")
    @OptionGroup var connection: Connection

    func run() async throws {
        try await connection.perform(ControlRequest(command: .reload), fallback: "reloaded")
    }
}

struct Stop: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Drain and stop the gateway (as SIGQUIT; --fast as SIGTERM).")
    @OptionGroup var connection: Connection
    @Flag(help: "Say goodbye to every client at once instead of spreading it over the drain window.") var fast = false

    func run() async throws {
        try await connection.perform(ControlRequest(command: .stop, fast: fast), fallback: "stopping")
    }
}

struct Scale: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run N workers (as SIGTTIN/SIGTTOU, by any step).")
    @OptionGroup var connection: Connection
    @Argument(help: "Number of workers, 1 to 256.") var count: Int

    func run() async throws {
        try await connection.perform(ControlRequest(command: .scale, count: count), fallback: "scaling")
    }
}

struct Kick: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Close every connection of a user (bye kicked, close 4002).")
    @OptionGroup var connection: Connection
    @Argument(help: "The user name.") var user: String

    func run() async throws {
        try await connection.perform(ControlRequest(command: .kick, user: user), fallback: "kicked")
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mint a JWT (HS256) for local testing of auth.mode jwt.",
        discussion: "The secret comes from --secret, else $CHATGW_AUTH_JWT_SECRET, else auth.jwt_secret of --config.")
    @Option(help: "The user name (the sub claim).") var user: String
    @Option(help: "Lifetime in seconds.") var ttl = 3600
    @Option(help: "Rooms the user may join, comma-separated; a trailing * matches a prefix. Default: any room.") var rooms: String?
    @Option(help: "The HMAC secret.") var secret: String?
    @Option(help: "The chatgw config file, to read auth.jwt_secret.") var config: String?

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        var key = secret ?? environment["CHATGW_AUTH_JWT_SECRET"]
        if key == nil, let config, let loaded = try? await ConfigLoader.load(file: config, environment: environment, overrides: [:]) {
            key = loaded.auth.jwtSecret
        }
        guard let key, !key.isEmpty else {
            printError("no secret: pass --secret, set CHATGW_AUTH_JWT_SECRET, or --config with auth.jwt_secret")
            throw ExitCode(1)
        }
        let verifier: TokenVerifier
        do {
            verifier = try await TokenVerifier(secret: key)
        } catch {
            printError(error.description)
            throw ExitCode(1)
        }
        let list = rooms.map { $0.split(separator: ",").map { String($0) } }
        print(try await verifier.mint(user: user, lifetime: TimeInterval(ttl), rooms: list))
    }
}
