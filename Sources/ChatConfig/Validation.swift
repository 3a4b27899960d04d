import Foundation

extension GatewayConfig {
    /// Checks every key's range and the rules between keys; throws for the first problem.
    ///
    /// Pure: looks at nothing but the config (no files, no environment).
    public func validate() throws(ConfigError) {
        for field in ConfigField.all {
            let (text, isValid) = field.check(self)
            if !isValid { throw field.invalid(got: text) }
        }
        try require(
            supervisor.restartBackoffMaxMs >= supervisor.restartBackoffInitialMs,
            "supervisor.restart_backoff_max_ms",
            mustBe: "at least supervisor.restart_backoff_initial_ms (\(supervisor.restartBackoffInitialMs))",
            got: supervisor.restartBackoffMaxMs.configText)
        try require(
            supervisor.heartbeatTimeoutSeconds * 1000 > Double(supervisor.heartbeatIntervalMs),
            "supervisor.heartbeat_timeout_s",
            mustBe: "longer than supervisor.heartbeat_interval_ms (\(supervisor.heartbeatIntervalMs) ms)",
            got: supervisor.heartbeatTimeoutSeconds.configText)
        try require(
            limits.idleTimeoutSeconds > limits.idlePingSeconds,
            "limits.idle_timeout_s",
            mustBe: "greater than limits.idle_ping_s (\(limits.idlePingSeconds))",
            got: limits.idleTimeoutSeconds.configText)
        // HS256 keys shorter than the hash output are guessable (and jwt-kit refuses them).
        try require(
            auth.mode != .jwt || auth.jwtSecret.utf8.count >= 32,
            "auth.jwt_secret",
            mustBe: "at least 32 bytes when auth.mode is jwt",
            got: auth.jwtSecret.isEmpty ? "" : "<secret of \(auth.jwtSecret.utf8.count) bytes>")
        // bind(2) on a longer Unix socket path fails with a less helpful error, in a child.
        try require(
            controlSocketPath.utf8.count <= Self.maxSocketPathBytes,
            "control.socket",
            mustBe: "a path of at most \(Self.maxSocketPathBytes) bytes",
            got: controlSocketPath)
        try require(
            bus.kind != .relay || relaySocketPath.utf8.count <= Self.maxSocketPathBytes,
            "bus.relay_socket",
            mustBe: "a path of at most \(Self.maxSocketPathBytes) bytes",
            got: relaySocketPath)
        try require(
            bus.kind != .redis || RedisEndpoint(url: bus.redisURL) != nil,
            "bus.redis_url",
            mustBe: "redis://[:password@]host[:port][/db] or unix:///path[?db=N]",
            got: bus.redisURL)
    }

    /// sun_path less its terminating NUL: 107 on Linux, 103 on macOS.
    static let maxSocketPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    private func require(_ condition: Bool, _ key: String, mustBe allowed: String, got: String) throws(ConfigError) {
        if !condition { throw .invalid(key, mustBe: allowed, got: got) }
    }
}
