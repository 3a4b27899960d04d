#if canImport(Glibc)
import Glibc
#endif
import CSystemShims

/// Process-level facts and controls shared by the master and its children.
public enum ProcessControl {
    /// Reaps every child that has ended, without blocking.
    public static func reapExited() -> [(pid: pid_t, status: ExitStatus)] {
        var ended: [(pid: pid_t, status: ExitStatus)] = []
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            guard pid > 0 else { break }
            ended.append((pid, ExitStatus(waitStatus: status)))
        }
        return ended
    }

    /// Makes the kernel send `signal` to us when the master dies, so that a SIGKILLed
    /// master leaves no orphan. Exits at once if the master is already gone.
    public static func dieWithParent(signal: Int32, expectedParent: pid_t) {
        _ = chatgw_set_parent_death_signal(signal)
        if getppid() != expectedParent {
            exit(0)
        }
    }

    /// Resident set size in bytes, from /proc/self/statm.
    public static func residentBytes() -> Int {
        guard let file = fopen("/proc/self/statm", "r") else { return 0 }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        guard fgets(&line, 256, file) != nil else { return 0 }
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let fields = text.split(separator: " ")
        guard fields.count >= 2, let pages = Int(fields[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    public static func processorCount() -> Int {
        max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }
}

/// Seconds on the monotonic clock, for timeouts and uptimes.
public func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

/// Milliseconds since the Unix epoch, for message timestamps.
public func wallClockMilliseconds() -> Int {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Int(now.tv_sec) * 1000 + Int(now.tv_nsec) / 1_000_000
}
