import Foundation

/// The whole gateway configuration, one stored property per key of etc/chatgw.yaml
/// (the keys and their ranges: `ConfigField.all`).
///
/// `GatewayConfig()` holds the built-in defaults. Load it with `ConfigLoader.load`, which
/// also validates it; the master passes the result to its children with `encodedJSON()`
/// and `decodeFromEnvironmentJSON(_:)`.
public struct GatewayConfig: Sendable, Codable, Equatable {
    /// `server.*`: listening socket, workers and the state directory.
    public var server = Server()
    /// `supervisor.*`: worker restarts, draining and liveness.
    public var supervisor = Supervisor()
    /// `control.*`: the chatctl control socket.
    public var control = Control()
    /// `bus.*`: how workers share rooms.
    public var bus = Bus()
    /// `history.*`: messages kept per room.
    public var history = History()
    /// `limits.*`: per-connection protocol limits.
    public var limits = Limits()
    /// `delivery.*`: how room messages are written to members.
    public var delivery = Delivery()
    /// `archive.*`
    public var archive = Archive()
    /// `auth.*`: client authentication.
    public var auth = Auth()
    /// `api.*`: the HTTP API.
    public var api = API()
    /// `metrics.*`: the Prometheus endpoint.
    public var metrics = Metrics()
    /// `conformance.*`: settings for protocol conformance test suites.
    public var conformance = Conformance()
    /// `log.*`: logging.
    public var log = Log()

    /// The built-in defaults.
    public init() {}

    /// The most workers `server.workers` allows.
    public static let maxWorkers = 256

    public struct Server: Sendable, Codable, Equatable {
        /// `server.listen`: the client-facing TCP address.
        public var listen = ListenAddress(host: "127.0.0.1", port: 8080)
        /// `server.workers`: worker processes, "auto" = one per core, else 1...256.
        public var workers = WorkerCount.auto
        /// `server.backlog`: listen(2) backlog, 1...65535.
        public var backlog = 4096
        /// `server.state_dir`: directory for the pid file and sockets; the master creates it if missing.
        public var stateDirectory = "run"
        /// `server.pid_file`: "" means `<state_dir>/chatgw.pid`; use `GatewayConfig.pidFilePath`.
        public var pidFile = ""
        /// `server.heartbeat_s`: heartbeat interval announced to clients in hello, 1...3600 s.
        public var heartbeatSeconds = 30
        /// `server.web_page`: serve the built-in web chat page at `GET /`.
        public var webPage = true
        /// `server.allowed_origins`: comma-separated `Origin` values a WebSocket upgrade may
        /// carry; "" allows any (and requests without Origin, from non-browser clients).
        public var allowedOrigins = ""
        /// `server.engine`: what holds the workers' client sockets.
        public var engine = ClientEngine.epoll
        /// `server.engine_wakeup`: how the epoll loop's events wake the worker's thread.
        public var engineWakeup = EngineWakeup.ioUring
        public init() {}

        /// `allowedOrigins` as a list; empty means any origin.
        public var originList: [String] {
            allowedOrigins.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        }
    }

    public struct Supervisor: Sendable, Codable, Equatable {
        /// `supervisor.restart_backoff_initial_ms`: first restart delay, 1...60000 ms.
        public var restartBackoffInitialMs = 100
        /// `supervisor.restart_backoff_max_ms`: restart delay cap, >= the initial delay.
        public var restartBackoffMaxMs = 5000
        /// `supervisor.restart_reset_after_s`: uptime after which the backoff starts over, 1...86400 s.
        public var restartResetAfterSeconds = 30
        /// `supervisor.crash_loop_restarts`: consecutive short-lived exits that mark a slot crash-looping, 1...1000.
        public var crashLoopRestarts = 5
        /// `supervisor.drain_timeout_s`: how long a draining worker may keep connections, 0.1...3600 s.
        public var drainTimeoutSeconds = 10.0
        /// `supervisor.heartbeat_interval_ms`: child -> master heartbeat period, 10...60000 ms.
        public var heartbeatIntervalMs = 1000
        /// `supervisor.heartbeat_timeout_s`: silence after which a child is hung, longer than the interval.
        public var heartbeatTimeoutSeconds = 10.0
        public init() {}
    }

    public struct Control: Sendable, Codable, Equatable {
        /// `control.socket`: "" means `<state_dir>/chatgw.ctl`; use `GatewayConfig.controlSocketPath`.
        public var socket = ""
        public init() {}
    }

    public struct Bus: Sendable, Codable, Equatable {
        /// `bus.kind`: embedded relay or Redis.
        public var kind = BusKind.relay
        /// `bus.relay_socket`: "" means `<state_dir>/relay.sock`; use `GatewayConfig.relaySocketPath`.
        public var relaySocket = ""
        /// `bus.redis_url`: Redis server used when `kind` is redis.
        public var redisURL = "redis://127.0.0.1:6379/0"
        /// `bus.outage_wait_ms`: how long a join or send waits for an unreachable bus (a
        /// relay or Redis restart) before the client is told `unavailable`, 0...600000 ms.
        public var outageWaitMs = 5000
        public init() {}

        /// Whether both name the same bus; the workers' own settings aside.
        public func sameEndpoint(as other: Bus) -> Bool {
            kind == other.kind && relaySocket == other.relaySocket && redisURL == other.redisURL
        }
    }

    public struct Delivery: Sendable, Codable, Equatable {
        /// `delivery.max_delay_ms`: the longest a busy room gathers its members' frames to
        /// write them together, 0...2000 ms; 0 writes every message at once.
        public var maxDelayMs = 200
        public init() {}
    }

    public struct History: Sendable, Codable, Equatable {
        /// `history.messages`: messages kept per room, 0...100000.
        public var messages = 100
        /// `history.max_age_s`: messages older than this are dropped, 1...31536000 s.
        public var maxAgeSeconds = 3600
        /// `history.persist`: whether the relay keeps history on disk.
        public var persist = false
        /// `history.dir`: "" means `<state_dir>/history`; use `GatewayConfig.historyDirectory`.
        public var directory = ""
        public init() {}
    }

    /// Where every sequenced message is kept for scroll-back and long resumes.
    public enum ArchiveKind: String, Sendable, Codable, Equatable, CaseIterable {
        case none, sqlite, postgres
    }

    public struct Archive: Sendable, Codable, Equatable {
        /// `archive.kind`: none, sqlite (a file under the state dir) or postgres (shared by a fleet).
        public var kind = ArchiveKind.sqlite
        /// `archive.sqlite_path`: "" means `<state_dir>/archive.sqlite`; use `GatewayConfig.archiveSQLitePath`.
        public var sqlitePath = ""
        /// `archive.postgres_url`: postgres://user[:password]@host[:port]/database.
        public var postgresURL = "postgres://chatgw@127.0.0.1:5432/chatgw"
        /// `archive.postgres_timeout_ms`: the longest one write or read waits for PostgreSQL
        /// before it is given up (a write is then retried, its messages kept in memory).
        public var postgresTimeoutMs = 10_000
        /// `archive.batch_messages`: most messages written in one transaction.
        public var batchMessages = 1000
        /// `archive.batch_ms`: longest a message waits before its batch is written.
        public var batchMilliseconds = 100
        /// `archive.backlog_messages`: messages held in memory while the database is down,
        /// besides the batch being written; beyond that the oldest are dropped (and fetched
        /// again from the bus history later).
        public var backlogMessages = 200_000
        /// `archive.retention_days`: messages older than this are deleted; 0 keeps them forever.
        public var retentionDays = 30
        /// `archive.retention_messages`: newest messages kept per room; 0 keeps all.
        public var retentionMessages = 0
        public init() {}
    }

    public struct Limits: Sendable, Codable, Equatable {
        /// `limits.max_frame_bytes`: largest WebSocket frame accepted, 125...67108864.
        public var maxFrameBytes = 65536
        /// `limits.max_text_bytes`: largest message `text` in UTF-8 bytes, 1...16777216.
        public var maxTextBytes = 4096
        /// `limits.rate_per_s`: messages per second per connection, > 0.
        public var ratePerSecond = 10.0
        /// `limits.burst`: messages a connection may send at once above the rate, >= 1.
        public var burst = 20
        /// `limits.flood_violations`: rate-limited requests within 10 s before "bye flood", >= 1.
        public var floodViolations = 20
        /// `limits.rooms_per_connection`: rooms one connection may join, 1...10000.
        public var roomsPerConnection = 50
        /// `limits.outbound_buffer_bytes`: unsent bytes queued per connection before it is dropped, >= 1024.
        public var outboundBufferBytes = 1_048_576
        /// `limits.idle_ping_s`: idle time before the server pings, >= 1 s.
        public var idlePingSeconds = 30
        /// `limits.idle_timeout_s`: idle time before the connection is closed, > idle_ping_s.
        public var idleTimeoutSeconds = 75
        public init() {}
    }

    public struct Auth: Sendable, Codable, Equatable {
        /// `auth.mode`: none or jwt.
        public var mode = AuthMode.none
        /// `auth.jwt_secret` (secret): HMAC key for JWTs, required when `mode` is jwt.
        public var jwtSecret = ""
        public init() {}
    }

    public struct API: Sendable, Codable, Equatable {
        /// `api.key` (secret): key the HTTP API requires; "" disables the API.
        public var key = ""
        public init() {}
    }

    public struct Metrics: Sendable, Codable, Equatable {
        /// `metrics.listen`: Prometheus endpoint address; nil (written "") disables it.
        public var listen: ListenAddress? = ListenAddress(host: "127.0.0.1", port: 9090)
        public init() {}
    }

    public struct Conformance: Sendable, Codable, Equatable {
        /// `conformance.echo`: echo every message back, for WebSocket conformance suites.
        public var echo = false
        /// `conformance.max_message_bytes`: largest message in echo mode, >= 1.
        public var maxMessageBytes = 16_777_216
        public init() {}
    }

    public struct Log: Sendable, Codable, Equatable {
        /// `log.level`: minimum level logged.
        public var level = LogLevel.info
        /// `log.format`: plain text lines or JSON lines.
        public var format = LogFormat.plain
        public init() {}
    }
}

// MARK: - Derived paths

// These resolve "" to a name under server.state_dir. Paths are used as given: a relative
// state_dir or path stays relative to the current directory of the process using it, so
// the master and its children must not change directory.
extension GatewayConfig {
    /// The master's pid file.
    public var pidFilePath: String { server.pidFile.isEmpty ? inStateDirectory("chatgw.pid") : server.pidFile }
    /// The Unix socket chatctl talks to.
    public var controlSocketPath: String { control.socket.isEmpty ? inStateDirectory("chatgw.ctl") : control.socket }
    /// The embedded relay's Unix socket.
    public var relaySocketPath: String { bus.relaySocket.isEmpty ? inStateDirectory("relay.sock") : bus.relaySocket }
    /// The archiver's SQLite file when `archive.kind` is sqlite.
    public var archiveSQLitePath: String { archive.sqlitePath.isEmpty ? inStateDirectory("archive.sqlite") : archive.sqlitePath }
    /// Where the relay keeps history when `history.persist` is on.
    public var historyDirectory: String { history.directory.isEmpty ? inStateDirectory("history") : history.directory }

    private func inStateDirectory(_ name: String) -> String {
        server.stateDirectory.hasSuffix("/") ? server.stateDirectory + name : server.stateDirectory + "/" + name
    }
}

// MARK: - Master -> child hand-off

extension GatewayConfig {
    /// The environment variable the master puts `encodedJSON()` in for its children.
    /// Not a config key, so `ConfigLoader` ignores it.
    public static let environmentJSONVariable = "CHATGW_CONFIG_JSON"

    /// The config as one line of JSON (Swift property names), secrets included.
    public func encodedJSON() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Only non-finite doubles make JSONEncoder throw; this keeps such a config encodable.
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        do {
            return String(decoding: try encoder.encode(self), as: UTF8.self)
        } catch {
            preconditionFailure("GatewayConfig is always encodable: \(error)")
        }
    }

    /// Decodes what `encodedJSON()` produced and validates it.
    ///
    /// Throws `ConfigError` only: a decoding failure has no key and describes the JSON problem.
    public static func decodeFromEnvironmentJSON(_ json: String) throws(ConfigError) -> GatewayConfig {
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        let config: GatewayConfig
        do {
            config = try decoder.decode(GatewayConfig.self, from: Data(json.utf8))
        } catch {
            throw ConfigError(key: nil, message: "invalid config JSON from the master: \(oneLine(error))")
        }
        try config.validate()
        return config
    }
}

/// An error's description squeezed onto one line.
func oneLine(_ error: any Error) -> String {
    String(describing: error).split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
}
