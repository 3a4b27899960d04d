import Testing
@testable import ChatConfig

/// One broken rule: what to change in a valid config and the key the error must name.
struct Violation: Sendable, CustomTestStringConvertible {
    let key: String
    let change: @Sendable (inout GatewayConfig) -> Void
    var testDescription: String { key }

    init(_ key: String, _ change: @escaping @Sendable (inout GatewayConfig) -> Void) {
        self.key = key
        self.change = change
    }
}

@Suite struct ValidationTests {
    @Test func defaultsAreValid() throws {
        try GatewayConfig().validate()
    }

    static let violations: [Violation] = [
        Violation("server.listen") { $0.server.listen = ListenAddress(host: "127.0.0.1", port: 65536) },
        Violation("server.listen") { $0.server.listen = ListenAddress(host: "example.com", port: 80) },
        Violation("server.workers") { $0.server.workers = .fixed(0) },
        Violation("server.workers") { $0.server.workers = .fixed(257) },
        Violation("server.backlog") { $0.server.backlog = 0 },
        Violation("server.backlog") { $0.server.backlog = 65536 },
        Violation("server.state_dir") { $0.server.stateDirectory = "" },
        Violation("server.heartbeat_s") { $0.server.heartbeatSeconds = 0 },
        Violation("server.heartbeat_s") { $0.server.heartbeatSeconds = 3601 },
        Violation("supervisor.restart_backoff_initial_ms") { $0.supervisor.restartBackoffInitialMs = 0 },
        Violation("supervisor.restart_backoff_initial_ms") { $0.supervisor.restartBackoffInitialMs = 60001 },
        Violation("supervisor.restart_backoff_max_ms") { $0.supervisor.restartBackoffMaxMs = 99 },
        Violation("supervisor.restart_reset_after_s") { $0.supervisor.restartResetAfterSeconds = 0 },
        Violation("supervisor.restart_reset_after_s") { $0.supervisor.restartResetAfterSeconds = 86401 },
        Violation("supervisor.crash_loop_restarts") { $0.supervisor.crashLoopRestarts = 0 },
        Violation("supervisor.crash_loop_restarts") { $0.supervisor.crashLoopRestarts = 1001 },
        Violation("supervisor.drain_timeout_s") { $0.supervisor.drainTimeoutSeconds = 0.05 },
        Violation("supervisor.drain_timeout_s") { $0.supervisor.drainTimeoutSeconds = 3600.5 },
        Violation("supervisor.heartbeat_interval_ms") { $0.supervisor.heartbeatIntervalMs = 9 },
        Violation("supervisor.heartbeat_interval_ms") { $0.supervisor.heartbeatIntervalMs = 60001 },
        Violation("supervisor.heartbeat_timeout_s") { $0.supervisor.heartbeatTimeoutSeconds = 1 },
        Violation("supervisor.heartbeat_timeout_s") { $0.supervisor.heartbeatTimeoutSeconds = 0 },
        Violation("control.socket") { $0.control.socket = String(repeating: "s", count: 200) },
        Violation("bus.relay_socket") { $0.bus.relaySocket = String(repeating: "r", count: 200) },
        Violation("history.messages") { $0.history.messages = -1 },
        Violation("history.messages") { $0.history.messages = 100_001 },
        Violation("history.max_age_s") { $0.history.maxAgeSeconds = 0 },
        Violation("history.max_age_s") { $0.history.maxAgeSeconds = 31_536_001 },
        Violation("limits.max_frame_bytes") { $0.limits.maxFrameBytes = 124 },
        Violation("limits.max_frame_bytes") { $0.limits.maxFrameBytes = 67_108_865 },
        Violation("limits.max_text_bytes") { $0.limits.maxTextBytes = 0 },
        Violation("limits.max_text_bytes") { $0.limits.maxTextBytes = 16_777_217 },
        Violation("limits.rate_per_s") { $0.limits.ratePerSecond = 0 },
        Violation("limits.burst") { $0.limits.burst = 0 },
        Violation("limits.flood_violations") { $0.limits.floodViolations = 0 },
        Violation("limits.rooms_per_connection") { $0.limits.roomsPerConnection = 0 },
        Violation("limits.rooms_per_connection") { $0.limits.roomsPerConnection = 10001 },
        Violation("limits.outbound_buffer_bytes") { $0.limits.outboundBufferBytes = 1023 },
        Violation("limits.idle_ping_s") { $0.limits.idlePingSeconds = 0 },
        Violation("limits.idle_timeout_s") { $0.limits.idleTimeoutSeconds = 30 },
        Violation("auth.jwt_secret") { $0.auth.mode = .jwt },
        Violation("metrics.listen") { $0.metrics.listen = ListenAddress(host: "localhost", port: -1) },
        Violation("conformance.max_message_bytes") { $0.conformance.maxMessageBytes = 0 },
    ]

    @Test(arguments: violations)
    func ruleRejectsWithItsKey(_ violation: Violation) {
        var config = GatewayConfig()
        violation.change(&config)
        #expect(throws: ConfigError.self) { try config.validate() }
        do {
            try config.validate()
        } catch {
            #expect(error.key == violation.key)
            #expect(error.description.hasPrefix("invalid config: \(violation.key): must be "))
            #expect(error.description.contains("(got "))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func crossFieldMessages() {
        var config = GatewayConfig()
        config.supervisor.restartBackoffMaxMs = 50
        #expect(throws: ConfigError(key: "supervisor.restart_backoff_max_ms",
                                    message: #"must be at least supervisor.restart_backoff_initial_ms (100) (got "50")"#)) {
            try config.validate()
        }
        config = GatewayConfig()
        config.supervisor.heartbeatTimeoutSeconds = 0.5
        #expect(throws: ConfigError(key: "supervisor.heartbeat_timeout_s",
                                    message: #"must be longer than supervisor.heartbeat_interval_ms (1000 ms) (got "0.5")"#)) {
            try config.validate()
        }
    }

    @Test func boundaryValuesAreAccepted() throws {
        var config = GatewayConfig()
        config.server.workers = .fixed(256)
        config.server.listen = ListenAddress(host: "::", port: 0)
        config.supervisor.restartBackoffMaxMs = config.supervisor.restartBackoffInitialMs
        config.supervisor.heartbeatTimeoutSeconds = 1.001
        config.limits.idleTimeoutSeconds = config.limits.idlePingSeconds + 1
        config.history.messages = 0
        config.auth.mode = .jwt
        config.auth.jwtSecret = "0123456789abcdef0123456789abcdef"
        config.metrics.listen = nil
        try config.validate()
    }

    @Test func redisBusIgnoresTheRelaySocketLength() throws {
        var config = GatewayConfig()
        config.bus.kind = .redis
        config.bus.relaySocket = String(repeating: "r", count: 200)
        try config.validate()
    }
}
