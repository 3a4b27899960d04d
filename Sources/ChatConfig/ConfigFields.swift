import Foundation

/// A value that can be written as the text of a YAML scalar, an environment variable or a flag.
protocol ConfigText: Sendable {
    /// nil when `text` is not of this type; ranges are checked later, by `validate()`.
    init?(configText text: String)
    var configText: String { get }
}

extension Int: ConfigText {
    init?(configText text: String) { self.init(text.trimmingCharacters(in: .whitespaces)) }
    var configText: String { String(self) }
}

extension Double: ConfigText {
    init?(configText text: String) {
        // Infinity and NaN would pass some range checks by accident and cannot go into JSON.
        guard let value = Double(text.trimmingCharacters(in: .whitespaces)), value.isFinite else { return nil }
        self = value
    }
    /// 10 rather than 10.0, as the user would write it.
    var configText: String { self == rounded() && abs(self) < 1e15 ? String(Int(self)) : String(self) }
}

extension Bool: ConfigText {
    init?(configText text: String) {
        switch text.trimmingCharacters(in: .whitespaces).lowercased() {
        case "true", "yes", "on", "1": self = true
        case "false", "no", "off", "0": self = false
        default: return nil
        }
    }
    var configText: String { String(self) }
}

extension String: ConfigText {
    init?(configText text: String) { self = text }
    var configText: String { self }
}

extension WorkerCount: ConfigText {
    init?(configText text: String) { self.init(text) }
    var configText: String { description }
}

extension ListenAddress: ConfigText {
    init?(configText text: String) { self.init(text) }
    var configText: String { description }
}

/// `metrics.listen`: "" disables.
extension Optional: ConfigText where Wrapped == ListenAddress {
    init?(configText text: String) {
        if text.isEmpty {
            self = .none
        } else if let address = ListenAddress(text) {
            self = .some(address)
        } else {
            return nil
        }
    }
    var configText: String { self?.description ?? "" }
}

extension ConfigText where Self: RawRepresentable & CaseIterable, RawValue == String {
    init?(configText text: String) { self.init(rawValue: text.trimmingCharacters(in: .whitespaces).lowercased()) }
    var configText: String { rawValue }
    /// `"relay" or "redis"`, `one of "trace", "debug", ...`
    static var allowed: String {
        let names = allCases.map { "\"\($0.rawValue)\"" }
        return names.count == 2 ? names.joined(separator: " or ") : "one of " + names.joined(separator: ", ")
    }
}

extension BusKind: ConfigText {}
extension ClientEngine: ConfigText {}
extension EngineWakeup: ConfigText {}
extension AuthMode: ConfigText {}
extension LogLevel: ConfigText {}
extension LogFormat: ConfigText {}
extension GatewayConfig.ArchiveKind: ConfigText {}

/// One config key: its name, how to read it into a `GatewayConfig` and its allowed range.
/// `ConfigField.all` is the single list of keys the loader, the validator and the file check use.
struct ConfigField: Sendable {
    /// Dotted key as in the file: "limits.rate_per_s".
    let key: String
    /// What the key accepts, for messages: "an integer from 1 to 65535".
    let allowed: String
    let isSecret: Bool
    /// Stores `text` in the config; false when it is not of the key's type.
    let assign: @Sendable (inout GatewayConfig, String) -> Bool
    /// The key's current value as text, and whether it is in range.
    let check: @Sendable (GatewayConfig) -> (text: String, isValid: Bool)

    init<Value: ConfigText>(
        _ key: String,
        _ path: WritableKeyPath<GatewayConfig, Value> & Sendable,
        _ allowed: String,
        secret: Bool = false,
        valid: @escaping @Sendable (Value) -> Bool = { _ in true }
    ) {
        self.key = key
        self.allowed = allowed
        self.isSecret = secret
        self.assign = { config, text in
            guard let value = Value(configText: text) else { return false }
            config[keyPath: path] = value
            return true
        }
        self.check = { config in
            let value = config[keyPath: path]
            return (value.configText, valid(value))
        }
    }

    func invalid(got: String) -> ConfigError {
        .invalid(key, mustBe: allowed, got: isSecret ? "<secret>" : got)
    }

    static func int(_ key: String, _ path: WritableKeyPath<GatewayConfig, Int> & Sendable, _ range: ClosedRange<Int>) -> ConfigField {
        ConfigField(key, path, "an integer from \(range.lowerBound) to \(range.upperBound)", valid: { range.contains($0) })
    }

    static func int(_ key: String, _ path: WritableKeyPath<GatewayConfig, Int> & Sendable, atLeast minimum: Int) -> ConfigField {
        ConfigField(key, path, "an integer of at least \(minimum)", valid: { $0 >= minimum })
    }

    static func number(_ key: String, _ path: WritableKeyPath<GatewayConfig, Double> & Sendable, _ range: ClosedRange<Double>) -> ConfigField {
        ConfigField(key, path, "a number from \(range.lowerBound.configText) to \(range.upperBound.configText)", valid: { range.contains($0) })
    }

    static func number(_ key: String, _ path: WritableKeyPath<GatewayConfig, Double> & Sendable, above minimum: Double) -> ConfigField {
        ConfigField(key, path, "a number greater than \(minimum.configText)", valid: { $0 > minimum })
    }

    static let all: [ConfigField] = [
        ConfigField("server.listen", \.server.listen, ListenAddress.allowed, valid: \.isValid),
        ConfigField("server.workers", \.server.workers, #""auto" or an integer from 1 to \#(GatewayConfig.maxWorkers)"#, valid: {
            if case .fixed(let count) = $0 { (1...GatewayConfig.maxWorkers).contains(count) } else { true }
        }),
        .int("server.backlog", \.server.backlog, 1...65535),
        ConfigField("server.state_dir", \.server.stateDirectory, "a non-empty path", valid: { !$0.isEmpty }),
        ConfigField("server.pid_file", \.server.pidFile, "a path"),
        .int("server.heartbeat_s", \.server.heartbeatSeconds, 1...3600),
        ConfigField("server.web_page", \.server.webPage, "true or false"),
        ConfigField("server.allowed_origins", \.server.allowedOrigins, "a comma-separated list of origins, or \"\" for any",
                    valid: { $0.split(separator: ",").allSatisfy { !$0.trimmingCharacters(in: .whitespaces).isEmpty } }),
        ConfigField("server.engine", \.server.engine, ClientEngine.allowed),
        ConfigField("server.engine_wakeup", \.server.engineWakeup, EngineWakeup.allowed),

        .int("supervisor.restart_backoff_initial_ms", \.supervisor.restartBackoffInitialMs, 1...60000),
        // Also >= restart_backoff_initial_ms, and the heartbeat timeout must exceed the
        // interval: cross-field rules live in validate().
        .int("supervisor.restart_backoff_max_ms", \.supervisor.restartBackoffMaxMs, atLeast: 1),
        .int("supervisor.restart_reset_after_s", \.supervisor.restartResetAfterSeconds, 1...86400),
        .int("supervisor.crash_loop_restarts", \.supervisor.crashLoopRestarts, 1...1000),
        .number("supervisor.drain_timeout_s", \.supervisor.drainTimeoutSeconds, 0.1...3600),
        .int("supervisor.heartbeat_interval_ms", \.supervisor.heartbeatIntervalMs, 10...60000),
        .number("supervisor.heartbeat_timeout_s", \.supervisor.heartbeatTimeoutSeconds, above: 0),

        ConfigField("control.socket", \.control.socket, "a path"),

        ConfigField("bus.kind", \.bus.kind, BusKind.allowed),
        ConfigField("bus.relay_socket", \.bus.relaySocket, "a path"),
        ConfigField("bus.redis_url", \.bus.redisURL, "a string"),
        .int("bus.outage_wait_ms", \.bus.outageWaitMs, 0...600_000),

        .int("delivery.max_delay_ms", \.delivery.maxDelayMs, 0...2000),

        .int("history.messages", \.history.messages, 0...100_000),
        .int("history.max_age_s", \.history.maxAgeSeconds, 1...31_536_000),
        ConfigField("history.persist", \.history.persist, "true or false"),
        ConfigField("history.dir", \.history.directory, "a path"),

        ConfigField("archive.kind", \.archive.kind, GatewayConfig.ArchiveKind.allowed),
        ConfigField("archive.sqlite_path", \.archive.sqlitePath, "a path"),
        ConfigField("archive.postgres_url", \.archive.postgresURL, "postgres://user[:password]@host[:port]/database",
                    valid: { $0.hasPrefix("postgres://") || $0.hasPrefix("postgresql://") }),
        .int("archive.postgres_timeout_ms", \.archive.postgresTimeoutMs, 100...600_000),
        .int("archive.batch_messages", \.archive.batchMessages, 1...100_000),
        .int("archive.batch_ms", \.archive.batchMilliseconds, 1...60_000),
        .int("archive.backlog_messages", \.archive.backlogMessages, 1_000...100_000_000),
        .int("archive.retention_days", \.archive.retentionDays, 0...36_500),
        .int("archive.retention_messages", \.archive.retentionMessages, 0...1_000_000_000),

        .int("limits.max_frame_bytes", \.limits.maxFrameBytes, 125...67_108_864),
        .int("limits.max_text_bytes", \.limits.maxTextBytes, 1...16_777_216),
        .number("limits.rate_per_s", \.limits.ratePerSecond, above: 0),
        .int("limits.burst", \.limits.burst, atLeast: 1),
        .int("limits.flood_violations", \.limits.floodViolations, atLeast: 1),
        .int("limits.rooms_per_connection", \.limits.roomsPerConnection, 1...10000),
        .int("limits.outbound_buffer_bytes", \.limits.outboundBufferBytes, atLeast: 1024),
        .int("limits.idle_ping_s", \.limits.idlePingSeconds, atLeast: 1),
        // Also > idle_ping_s, checked in validate().
        .int("limits.idle_timeout_s", \.limits.idleTimeoutSeconds, atLeast: 1),

        ConfigField("auth.mode", \.auth.mode, AuthMode.allowed),
        ConfigField("auth.jwt_secret", \.auth.jwtSecret, "a string", secret: true),

        ConfigField("api.key", \.api.key, "a string", secret: true),

        ConfigField("metrics.listen", \.metrics.listen, #""" (disabled) or "# + ListenAddress.allowed, valid: { $0?.isValid ?? true }),

        ConfigField("conformance.echo", \.conformance.echo, "true or false"),
        .int("conformance.max_message_bytes", \.conformance.maxMessageBytes, atLeast: 1),

        ConfigField("log.level", \.log.level, LogLevel.allowed),
        ConfigField("log.format", \.log.format, LogFormat.allowed),
    ]

    static let byKey = Dictionary(uniqueKeysWithValues: all.map { ($0.key, $0) })
}
