import Foundation
import Testing
@testable import ChatConfig

@Suite struct LoadingTests {
    @Test func builtInDefaults() async throws {
        let config = try await load()
        #expect(config == GatewayConfig())
        #expect(config.server.workers == .auto)
        #expect(config.server.listen == ListenAddress(host: "127.0.0.1", port: 8080))
        #expect(config.supervisor.drainTimeoutSeconds == 10)
        #expect(config.limits.ratePerSecond == 10)
        #expect(config.bus.kind == .relay)
        #expect(config.server.engine == .epoll)
        #expect(config.auth.mode == .none)
        #expect(config.metrics.listen?.description == "127.0.0.1:9090")
        #expect(config.log.level == .info)
        #expect(config.pidFilePath == "run/chatgw.pid")
        #expect(config.controlSocketPath == "run/chatgw.ctl")
        #expect(config.relaySocketPath == "run/relay.sock")
        #expect(config.historyDirectory == "run/history")
    }

    @Test func shippedFileHasSpecDefaultsWithTwoWorkers() async throws {
        let config = try await load(file: shippedConfigPath)
        var expected = GatewayConfig()
        expected.server.workers = .fixed(2)
        #expect(config == expected)
        try config.validate()
    }

    @Test func shippedFileListsEveryKeyWithAComment() throws {
        let lines = try String(contentsOfFile: shippedConfigPath, encoding: .utf8).split(separator: "\n")
        var section = ""
        var keys: [String] = []
        for (index, line) in lines.enumerated() where !line.hasPrefix("#") {
            if !line.hasPrefix(" ") {
                section = String(line.dropLast())  // "server:"
            } else if !line.trimmingCharacters(in: .whitespaces).hasPrefix("#"), let colon = line.firstIndex(of: ":") {
                let key = section + "." + line[..<colon].trimmingCharacters(in: .whitespaces)
                keys.append(key)
                #expect(lines[index - 1].hasPrefix("  # "), "\(key) has no comment")
            }
        }
        #expect(keys == ConfigLoader.keys)
    }

    @Test func derivedPathsFollowStateDirAndExplicitPaths() async throws {
        let config = try await load(flags: ["server.state_dir": "/var/run/chatgw/"])
        #expect(config.pidFilePath == "/var/run/chatgw/chatgw.pid")
        #expect(config.relaySocketPath == "/var/run/chatgw/relay.sock")
        let explicit = try await load(env: ["CHATGW_CONTROL_SOCKET": "ctl.sock", "CHATGW_HISTORY_DIR": "hist"])
        #expect(explicit.controlSocketPath == "ctl.sock")
        #expect(explicit.historyDirectory == "hist")
    }

    @Test func environmentOverridesEachType() async throws {
        let config = try await load(env: [
            "CHATGW_SERVER_WORKERS": "4",
            "CHATGW_SERVER_LISTEN": "127.0.0.1:9000",
            "CHATGW_LIMITS_RATE_PER_S": "5.5",
            "CHATGW_CONFORMANCE_ECHO": "true",
            "CHATGW_BUS_KIND": "redis",
            "CHATGW_BUS_REDIS_URL": "redis://10.0.0.1:6380/2",
            "CHATGW_METRICS_LISTEN": "",
            "CHATGW_LOG_LEVEL": "debug",
        ])
        #expect(config.server.workers == .fixed(4))
        #expect(config.server.listen == ListenAddress(host: "127.0.0.1", port: 9000))
        #expect(config.limits.ratePerSecond == 5.5)
        #expect(config.conformance.echo == true)
        #expect(config.bus.kind == .redis)
        #expect(config.bus.redisURL == "redis://10.0.0.1:6380/2")
        #expect(config.metrics.listen == nil)
        #expect(config.log.level == .debug)

        let auto = try await load(file: shippedConfigPath, env: ["CHATGW_SERVER_WORKERS": "auto"])
        #expect(auto.server.workers == .auto)
    }

    /// A valid, non-default value for every key.
    static let samples: [String: String] = [
        "server.listen": "[::1]:8081", "server.workers": "3", "server.backlog": "128",
        "server.state_dir": "/tmp/s", "server.pid_file": "p.pid", "server.heartbeat_s": "15",
        "supervisor.restart_backoff_initial_ms": "200", "supervisor.restart_backoff_max_ms": "9000",
        "supervisor.restart_reset_after_s": "60", "supervisor.crash_loop_restarts": "7",
        "supervisor.drain_timeout_s": "2.5", "supervisor.heartbeat_interval_ms": "500",
        "supervisor.heartbeat_timeout_s": "3", "control.socket": "c.sock", "bus.kind": "redis",
        "bus.relay_socket": "r.sock", "bus.redis_url": "redis://h:1/0", "bus.outage_wait_ms": "0", "delivery.max_delay_ms": "0", "history.messages": "0",
        "history.max_age_s": "60", "history.persist": "yes", "history.dir": "h",
        "limits.max_frame_bytes": "125", "limits.max_text_bytes": "100", "limits.rate_per_s": "0.5",
        "limits.burst": "1", "limits.flood_violations": "3", "limits.rooms_per_connection": "2",
        "limits.outbound_buffer_bytes": "2048", "limits.idle_ping_s": "5", "limits.idle_timeout_s": "80",
        "auth.mode": "jwt", "auth.jwt_secret": "0123456789abcdef0123456789abcdef", "api.key": "k", "metrics.listen": "localhost:0",
        "conformance.echo": "1", "conformance.max_message_bytes": "10", "log.level": "critical", "log.format": "json", "server.web_page": "false", "archive.kind": "postgres", "archive.sqlite_path": "a.db", "archive.postgres_url": "postgres://u@h:1/d", "archive.postgres_timeout_ms": "2500", "archive.batch_messages": "5", "archive.batch_ms": "7", "archive.backlog_messages": "5000", "archive.retention_days": "3", "archive.retention_messages": "9", "server.allowed_origins": "http://a.example, http://b.example",
        "server.engine": "nio",
        "server.engine_wakeup": "thread",
    ]

    @Test func everyKeyCanBeSetFromTheEnvironment() async throws {
        #expect(Set(Self.samples.keys) == Set(ConfigLoader.keys))
        let defaults = GatewayConfig()
        for (key, value) in Self.samples.sorted(by: { $0.key < $1.key }) {
            // auth.jwt_secret alone is not observable with mode none, so set both.
            var env = [ConfigLoader.environmentName(for: key): value]
            if key == "auth.mode" { env["CHATGW_AUTH_JWT_SECRET"] = "0123456789abcdef0123456789abcdef" }
            let config = try await load(env: env)
            #expect(config != defaults, "\(ConfigLoader.environmentName(for: key)) had no effect")
        }
        let all = try await load(env: Dictionary(uniqueKeysWithValues: Self.samples.map { (ConfigLoader.environmentName(for: $0.key), $0.value) }))
        let viaFlags = try await load(flags: Self.samples)
        #expect(all == viaFlags)
        #expect(all.limits.idleTimeoutSeconds == 80)
        #expect(all.server.listen.description == "[::1]:8081")
    }

    @Test func environmentNamesFollowTheSpec() {
        #expect(ConfigLoader.environmentName(for: "server.workers") == "CHATGW_SERVER_WORKERS")
        #expect(ConfigLoader.environmentName(for: "limits.rate_per_s") == "CHATGW_LIMITS_RATE_PER_S")
    }

    @Test func unknownEnvironmentVariablesAreIgnored() async throws {
        let config = try await load(env: ["CHATGW_SERVER_WROKERS": "x", "CHATGW_NOPE": "1", "PATH": "/bin"])
        #expect(config == GatewayConfig())
    }

    @Test func flagsBeatEnvironmentBeatFileBeatDefaults() async throws {
        let file = try temporaryConfig("server:\n  workers: 2\n  listen: 127.0.0.1:7000\n  backlog: 100\n")
        let env = ["CHATGW_SERVER_WORKERS": "3", "CHATGW_SERVER_LISTEN": "127.0.0.1:7001"]
        let flags = ["server.workers": "4"]

        let fileOnly = try await load(file: file)
        #expect(fileOnly.server.workers == .fixed(2))
        #expect(fileOnly.server.listen.port == 7000)
        #expect(fileOnly.server.heartbeatSeconds == 30)  // default where the file is silent

        let withEnv = try await load(file: file, env: env)
        #expect(withEnv.server.workers == .fixed(3))
        #expect(withEnv.server.listen.port == 7001)
        #expect(withEnv.server.backlog == 100)

        let withFlags = try await load(file: file, env: env, flags: flags)
        #expect(withFlags.server.workers == .fixed(4))
        #expect(withFlags.server.listen.port == 7001)
        #expect(withFlags.server.backlog == 100)
    }

    @Test func emptyFileMeansDefaults() async throws {
        let file = try temporaryConfig("# nothing here\n")
        #expect(try await load(file: file) == GatewayConfig())
        let sectionOnly = try temporaryConfig("server:\n  # workers: 3\n")
        #expect(try await load(file: sectionOnly) == GatewayConfig())
    }

    @Test func fileValuesMayBeQuoted() async throws {
        let file = try temporaryConfig("server:\n  workers: \"8\"\nhistory:\n  persist: \"true\"\nlimits:\n  rate_per_s: 2.5\n")
        let config = try await load(file: file)
        #expect(config.server.workers == .fixed(8))
        #expect(config.history.persist)
        #expect(config.limits.ratePerSecond == 2.5)
    }
}
