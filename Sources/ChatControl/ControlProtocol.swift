// The control socket's protocol, shared by the master and chatctl. One request per
// connection: the client writes one JSON object and a newline, the master answers with
// one JSON object and a newline and closes. Every message carries `v`; a master refuses a
// version it does not speak instead of guessing.

public enum ControlProtocol {
    public static let version = 1
    /// Longest request line the master reads before it answers with an error.
    public static let maximumRequestBytes = 4096
}

public enum ControlCommand: String, Codable, Sendable, CaseIterable {
    case status, workers, rooms, reload, stop, scale, kick
}

public struct ControlRequest: Codable, Sendable, Equatable {
    public var v: Int
    public var command: ControlCommand
    /// `rooms`: how many rooms, busiest first.
    public var top: Int?
    /// `scale`: the wanted number of workers.
    public var count: Int?
    /// `kick`: whose connections to close.
    public var user: String?
    /// `stop`: TERM-like immediate goodbye instead of a drain.
    public var fast: Bool?

    public init(command: ControlCommand, top: Int? = nil, count: Int? = nil, user: String? = nil, fast: Bool? = nil) {
        self.v = ControlProtocol.version
        self.command = command
        self.top = top
        self.count = count
        self.user = user
        self.fast = fast
    }
}

public struct ControlResponse: Codable, Sendable {
    public var v: Int
    public var ok: Bool
    public var error: String?
    public var message: String?
    public var status: StatusReport?
    public var rooms: [RoomStat]?

    public init(ok: Bool, error: String? = nil, message: String? = nil, status: StatusReport? = nil, rooms: [RoomStat]? = nil) {
        self.v = ControlProtocol.version
        self.ok = ok
        self.error = error
        self.message = message
        self.status = status
        self.rooms = rooms
    }

    public static func failure(_ error: String) -> ControlResponse { ControlResponse(ok: false, error: error) }
}

/// The outcome of the last reload.
public struct ReloadReport: Codable, Sendable, Equatable {
    public var ok: Bool
    /// Unix time, seconds.
    public var at: Double
    public var generation: Int
    public var error: String?

    public init(ok: Bool, at: Double, generation: Int, error: String?) {
        self.ok = ok
        self.at = at
        self.generation = generation
        self.error = error
    }
}

public struct StatusReport: Codable, Sendable {
    public var masterPid: Int32
    public var uptimeSeconds: Double
    public var version: String
    public var configPath: String?
    public var generation: Int
    public var listen: String
    public var wantedWorkers: Int
    public var lastReload: ReloadReport?
    public var watchdogKills: Int
    public var children: [ChildReport]
    /// Publish round trips through the bus over the workers' last heartbeat interval;
    /// nil when there were none.
    public var busLatency: LatencyReport?

    public init(masterPid: Int32, uptimeSeconds: Double, version: String, configPath: String?, generation: Int, listen: String,
                wantedWorkers: Int, lastReload: ReloadReport?, watchdogKills: Int, children: [ChildReport]) {
        self.masterPid = masterPid
        self.uptimeSeconds = uptimeSeconds
        self.version = version
        self.configPath = configPath
        self.generation = generation
        self.listen = listen
        self.wantedWorkers = wantedWorkers
        self.lastReload = lastReload
        self.watchdogKills = watchdogKills
        self.children = children
    }
}

public struct LatencyReport: Codable, Sendable, Equatable {
    public var p50Seconds: Double
    public var p99Seconds: Double
    public var count: Int

    public init(p50Seconds: Double, p99Seconds: Double, count: Int) {
        self.p50Seconds = p50Seconds
        self.p99Seconds = p99Seconds
        self.count = count
    }
}

/// What `/status.json` answers: `chatctl status --json`'s report with the busiest rooms
/// (`chatctl rooms --top`), or why those are missing.
public struct StatusSnapshot: Codable, Sendable {
    public var v: Int
    public var status: StatusReport
    public var rooms: [RoomStat]?
    public var roomsError: String?

    public init(status: StatusReport, rooms: [RoomStat]?, roomsError: String?) {
        self.v = ControlProtocol.version
        self.status = status
        self.rooms = rooms
        self.roomsError = roomsError
    }
}

public struct ChildReport: Codable, Sendable {
    public var role: String
    public var slot: Int
    public var pid: Int32
    public var generation: Int
    /// starting, running, draining or crash-looping (a slot waiting to restart).
    public var state: String
    public var uptimeSeconds: Double
    public var restarts: Int
    public var connections: Int
    public var rooms: Int
    public var messagesInPerSecond: Double
    public var messagesOutPerSecond: Double
    public var rssBytes: Int
    /// Archiver only: messages waiting to be written, and messages it could not get.
    public var archiveBacklog: Int?
    public var archiveLost: Int?

    public init(role: String, slot: Int, pid: Int32, generation: Int, state: String, uptimeSeconds: Double, restarts: Int,
                connections: Int, rooms: Int, messagesInPerSecond: Double, messagesOutPerSecond: Double, rssBytes: Int) {
        self.role = role
        self.slot = slot
        self.pid = pid
        self.generation = generation
        self.state = state
        self.uptimeSeconds = uptimeSeconds
        self.restarts = restarts
        self.connections = connections
        self.rooms = rooms
        self.messagesInPerSecond = messagesInPerSecond
        self.messagesOutPerSecond = messagesOutPerSecond
        self.rssBytes = rssBytes
    }
}

public struct RoomStat: Codable, Sendable, Equatable {
    public var room: String
    public var members: Int
    public var seq: Int
    public var messagesPerSecond: Double
    /// How the workers write the room's messages: `immediate` (each at the end of the loop
    /// tick it came in) or `coalesced` (gathered, several frames per write; a busy room).
    public var delivery: String?
    /// Coalesced rooms: frames per member write, averaged over the workers' members.
    public var framesPerWrite: Double?

    public init(room: String, members: Int, seq: Int, messagesPerSecond: Double) {
        self.room = room
        self.members = members
        self.seq = seq
        self.messagesPerSecond = messagesPerSecond
    }
}
