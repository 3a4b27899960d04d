#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so a
/// send time written by one chatbench process can be read back by another.
@inline(__always)
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

func sleepMillis(_ ms: Int) {
    usleep(useconds_t(ms * 1000))
}

/// Reads of /proc (and the processes' CPU clocks): CPU time, memory and the process tree.
enum Proc {
    /// CPU time is counted in µs.
    static let microsPerSecond = 1e6
    static let microsPerTick = 1_000_000 / Int(sysconf(Int32(_SC_CLK_TCK)))

    /// The whole content of a (pseudo-)file; /proc files have no size, so read until EOF.
    static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, 8192) }
            if n <= 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The fields of /proc/PID/stat after the command name: index 0 is field 3 (state).
    static func statFields(_ pid: Int32) -> [Substring]? {
        guard let text = read(pid == 0 ? "/proc/self/stat" : "/proc/\(pid)/stat"),
              let close = text.lastIndex(of: ")") else { return nil }
        return text[text.index(after: close)...].split(separator: " ")
    }

    /// A process's CPU time in µs; pid 0 is this process. Its CPU clock: every thread, to
    /// the nanosecond, a running one's to the moment. (/proc's utime + stime count in clock
    /// ticks, 10 ms: over a phase of 0.6 s on two workers a step of 0.5 µs per handshake.)
    static func cpuMicros(_ pid: Int32) -> Int? {
        var clock = CLOCK_PROCESS_CPUTIME_ID
        guard pid == 0 || clock_getcpuclockid(pid, &clock) == 0 else { return nil }
        var time = timespec()
        guard clock_gettime(clock, &time) == 0 else { return nil }
        return Int(time.tv_sec) * 1_000_000 + Int(time.tv_nsec) / 1000
    }

    /// The kernel's part of a process's CPU time in µs: stime (field 15), still in clock
    /// ticks, so coarse; it is shown, not judged. pid 0 is this process.
    static func systemMicros(_ pid: Int32) -> Int? {
        guard let f = statFields(pid), f.count > 12, let system = Int(f[12]) else { return nil }
        return system * microsPerTick
    }

    static func selfCPUMicros() -> Int { cpuMicros(0) ?? 0 }

    static func selfCPUSplit() -> (total: Int, system: Int) { (selfCPUMicros(), systemMicros(0) ?? 0) }

    static func parent(of pid: Int32) -> Int32? {
        guard let f = statFields(pid), f.count > 1 else { return nil }
        return Int32(f[1])
    }

    /// Rss and Pss in KiB from /proc/PID/smaps_rollup (pid 0 is this process).
    static func memoryKB(_ pid: Int32) -> (rss: Int, pss: Int)? {
        guard let text = read(pid == 0 ? "/proc/self/smaps_rollup" : "/proc/\(pid)/smaps_rollup") else { return nil }
        var rss = -1, pss = -1
        for line in text.split(separator: "\n") {
            if line.hasPrefix("Rss:") { rss = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? -1 }
            if line.hasPrefix("Pss:") { pss = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? -1 }
        }
        guard rss >= 0, pss >= 0 else { return nil }
        return (rss, pss)
    }

    static func commandLine(_ pid: Int32) -> String {
        guard let text = read("/proc/\(pid)/cmdline") else { return "" }
        return text.split(separator: "\0").joined(separator: " ")
    }

    /// Every live process below `root` (children, grandchildren, ...), found through the
    /// parent pid in /proc/*/stat.
    static func descendants(of root: Int32) -> [Int32] {
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        var children: [Int32: [Int32]] = [:]
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            guard let pid = Int32(name), let ppid = parent(of: pid) else { continue }
            children[ppid, default: []].append(pid)
        }
        var result: [Int32] = []
        var queue = children[root] ?? []
        while let pid = queue.popLast() {
            result.append(pid)
            queue.append(contentsOf: children[pid] ?? [])
        }
        return result.sorted()
    }

    /// Busy and total jiffies of the whole machine (first line of /proc/stat).
    static func machineTicks() -> (busy: Int, total: Int) {
        guard let text = read("/proc/stat"), let line = text.split(separator: "\n").first else { return (0, 0) }
        let values = line.split(separator: " ").dropFirst().compactMap { Int($0) }
        guard values.count >= 5 else { return (0, 0) }
        let total = values.reduce(0, +)
        let idle = values[3] + values[4]
        return (total - idle, total)
    }
}

/// The gateway's processes: the master and everything below it.
struct ServerProcesses {
    struct Member: Codable {
        var pid: Int32
        var role: String
    }

    let master: Int32
    var members: [Member]

    /// From an explicit pid, or the pid file in the state dir.
    static func find(serverPid: Int32?, stateDir: String?) -> ServerProcesses? {
        var pid = serverPid
        if pid == nil, let dir = stateDir, let text = Proc.read(dir + "/chatgw.pid") {
            pid = Int32(text.trimmed(" \n\t"))
        }
        guard let master = pid, kill(master, 0) == 0 else { return nil }
        var found = ServerProcesses(master: master, members: [])
        found.refresh()
        return found
    }

    /// Children come and go (restarts): look again.
    mutating func refresh() {
        members = ([master] + Proc.descendants(of: master)).map { Member(pid: $0, role: Self.role(of: $0, master: master)) }
    }

    private static func role(of pid: Int32, master: Int32) -> String {
        if pid == master { return "master" }
        let args = Proc.commandLine(pid).split(separator: " ").map(String.init)
        if let i = args.firstIndex(of: "worker") {
            if let s = args.firstIndex(of: "--slot"), s + 1 < args.count { return "worker \(args[s + 1])" }
            _ = i
            return "worker"
        }
        if args.contains("relay") { return "relay" }
        if args.contains("archiver") { return "archiver" }
        return args.first.map { String($0.split(separator: "/").last ?? "") } ?? "?"
    }

    func cpuMicros() -> Int {
        members.reduce(0) { $0 + (Proc.cpuMicros($1.pid) ?? 0) }
    }

    /// stime alone: the kernel's share (on loopback, the receiving end's TCP input too).
    func systemMicros() -> Int {
        members.reduce(0) { $0 + (Proc.systemMicros($1.pid) ?? 0) }
    }

    func cpuMicrosByRole() -> [String: Int] {
        var out: [String: Int] = [:]
        for m in members { out[m.role, default: 0] += Proc.cpuMicros(m.pid) ?? 0 }
        return out
    }

    func memoryByRole() -> [String: MemoryKB] {
        var out: [String: MemoryKB] = [:]
        for m in members {
            if let mem = Proc.memoryKB(m.pid) {
                out[m.role, default: MemoryKB()].rssKB += mem.rss
                out[m.role, default: MemoryKB()].pssKB += mem.pss
            }
        }
        return out
    }
}

struct MemoryKB: Codable {
    var rssKB = 0
    var pssKB = 0
}

extension String {
    func trimmed(_ set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}

/// Where client sockets connect: the URL's host resolved once (getaddrinfo), IPv4 or IPv6.
struct SocketTarget {
    let family: Int32
    private var storage = sockaddr_storage()
    private let length: socklen_t

    init(host: String, port: Int) throws {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        guard getaddrinfo(bare, String(port), &hints, &list) == 0, let first = list else {
            throw Engine.SetupError("cannot resolve \(host)")
        }
        defer { freeaddrinfo(list) }
        family = first.pointee.ai_family
        length = first.pointee.ai_addrlen
        withUnsafeMutableBytes(of: &storage) { dst in
            dst.copyMemory(from: UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(first.pointee.ai_addrlen)))
        }
    }

    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafeBytes(of: storage) { body($0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length) }
    }

    /// A source address to bind to ("127.0.0.2"), port 0.
    static func ipv4(_ text: String, port: UInt16) throws -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        guard inet_pton(AF_INET, text, &addr.sin_addr) == 1 else { throw Engine.SetupError("not an IPv4 address: \(text)") }
        return addr
    }
}
