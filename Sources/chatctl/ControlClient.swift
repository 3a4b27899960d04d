#if canImport(Glibc)
import Glibc
#endif
import ChatControl
import Foundation

/// One request over the master's control socket: connect, write a line, read the answer
/// to the end (the master closes after answering), with a timeout on every step.
enum ControlClient {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func exchange(_ request: ControlRequest, socketPath: String, timeoutSeconds: Int = 10) throws -> ControlResponse {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: String(cString: strerror(errno))) }
        defer { close(fd) }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw Failure(description: "socket path too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: pathBytes) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw Failure(description: String(cString: strerror(errno))) }
        var line = Array(try JSONEncoder().encode(request))
        line.append(UInt8(ascii: "\n"))
        guard line.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == line.count else {
            throw Failure(description: String(cString: strerror(errno)))
        }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let count = read(fd, &chunk, chunk.count)
            if count < 0 { throw Failure(description: "no answer: \(String(cString: strerror(errno)))") }
            if count == 0 { break }
            answer += chunk[0..<count]
        }
        do {
            return try JSONDecoder().decode(ControlResponse.self, from: Data(answer))
        } catch {
            throw Failure(description: "unreadable answer from the master")
        }
    }
}

/// Human tables.
enum Table {
    static func statusHeader(_ status: StatusReport) -> String {
        var lines = [
            "master pid \(status.masterPid), up \(duration(status.uptimeSeconds)), chatgw \(status.version)",
            "config \(status.configPath ?? "(built-in defaults)"), generation \(status.generation), listening on \(status.listen), \(status.wantedWorkers) workers wanted",
        ]
        if let reload = status.lastReload {
            let when = Date(timeIntervalSince1970: reload.at).formatted(.iso8601)
            lines.append(reload.ok ? "last reload: ok at \(when) (generation \(reload.generation))"
                                   : "last reload: FAILED at \(when): \(reload.error ?? "unknown reason")")
        } else {
            lines.append("last reload: none")
        }
        lines.append("watchdog kills: \(status.watchdogKills)")
        if let archiver = status.children.first(where: { $0.role == "archiver" }) {
            lines.append("archive: \(archiver.archiveBacklog ?? 0) messages waiting to be written, \(archiver.archiveLost ?? 0) lost (no longer in the bus history, or refused by the database)")
        }
        return lines.joined(separator: "\n")
    }

    static func children(_ children: [ChildReport]) -> String {
        let header = ["ROLE", "SLOT", "PID", "GEN", "STATE", "UPTIME", "RESTARTS", "CONNS", "ROOMS", "IN/S", "OUT/S", "RSS"]
        let rows = children.map { child in
            [child.role, "\(child.slot)", child.pid == 0 ? "-" : "\(child.pid)", "\(child.generation)", child.state,
             duration(child.uptimeSeconds), "\(child.restarts)", "\(child.connections)", "\(child.rooms)",
             rate(child.messagesInPerSecond), rate(child.messagesOutPerSecond), bytes(child.rssBytes)]
        }
        let total = ["total", "", "", "", "", "", "", "\(children.filter { $0.role == "worker" }.reduce(0) { $0 + $1.connections })", "", "", "", ""]
        return render([header] + rows + [total])
    }

    static func rooms(_ rooms: [RoomStat]) -> String {
        let header = ["ROOM", "MEMBERS", "SEQ", "MSG/S", "DELIVERY", "FRAMES/WRITE"]
        return render([header] + rooms.map {
            [$0.room, "\($0.members)", "\($0.seq)", rate($0.messagesPerSecond), $0.delivery ?? "-", $0.framesPerWrite.map(rate) ?? "1"]
        })
    }

    private static func render(_ rows: [[String]]) -> String {
        let widths = (0..<(rows.first?.count ?? 0)).map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces)
        }.joined(separator: "\n")
    }

    private static func duration(_ seconds: Double) -> String {
        let whole = Int(seconds)
        if whole < 60 { return "\(whole)s" }
        if whole < 3600 { return "\(whole / 60)m\(whole % 60)s" }
        return "\(whole / 3600)h\(whole % 3600 / 60)m"
    }

    private static func rate(_ value: Double) -> String {
        value >= 100 ? String(Int(value.rounded())) : String(format: "%.1f", value)
    }

    private static func bytes(_ value: Int) -> String {
        value >= 1 << 20 ? String(format: "%.1fM", Double(value) / Double(1 << 20)) : "\(value / 1024)K"
    }
}
