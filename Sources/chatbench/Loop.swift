import CChatEngine
#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers

/// The side of a shard's loop that other threads use: tasks posted from the orchestrator
/// (a few a second, never per message) and the pipe that wakes the loop for them.
final class LoopInbox: Sendable {
    /// The loop watches the read end.
    let wakeFd: Int32
    private let wakeWriteFd: Int32
    private let tasks = NIOLockedValueBox<[@Sendable (LoopShard) -> Void]>([])

    init() {
        var fds: [Int32] = [-1, -1]
        precondition(pipe(&fds) == 0, "pipe: \(errno)")
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        wakeFd = fds[0]
        wakeWriteFd = fds[1]
    }

    func post(_ task: @escaping @Sendable (LoopShard) -> Void) {
        tasks.withLockedValue { $0.append(task) }
        var one: UInt8 = 1
        _ = write(wakeWriteFd, &one, 1)
    }

    func take() -> [@Sendable (LoopShard) -> Void] {
        var drain: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        while read(wakeFd, &drain, 32) == 32 {}
        return tasks.withLockedValue { t in
            defer { t.removeAll(keepingCapacity: true) }
            return t
        }
    }
}

/// One thread's epoll loop over chatbench's client sockets, without NIO: a socket is
/// registered once, edge-triggered, for IN|OUT|RDHUP (connect completion, input and
/// write space alike), reads land in one scratch buffer per loop and are parsed where they
/// lie, writes go straight to the socket (queued on the connection only when it would
/// block). Connections are found by descriptor in a table; a descriptor is closed at the
/// end of the loop turn, so it is never reused while the turn's event list may still name
/// it. Timers: the few repeated tasks of a phase (launching at a rate, publishing) and the
/// connect deadlines, checked once a turn.
final class BenchLoop {
    let epfd: Int32
    let inbox: LoopInbox
    /// Every read of this loop lands here.
    let scratch: UnsafeMutableRawPointer
    static let scratchSize = 64 * 1024
    /// Connections by descriptor.
    let table: UnsafeMutablePointer<BenchConnection?>
    let capacity: Int
    private(set) var highestFd: Int32 = 0
    private let events: UnsafeMutablePointer<epoll_event>
    private static let maxEvents: Int32 = 512
    private var doomed: [Int32] = []
    var stopped = false

    private struct Timer {
        var id: Int
        var due: UInt64
        var period: UInt64
        var action: () -> Void
    }
    private var timers: [Timer] = []
    private var nextTimerID = 1
    /// Connections still connecting, in the order they started (one timeout for all, so
    /// their deadlines are in order too).
    private var connecting: [(due: UInt64, conn: BenchConnection)] = []
    private var connectingHead = 0

    static let IN: UInt32 = 0x001, OUT: UInt32 = 0x004, ERR: UInt32 = 0x008, HUP: UInt32 = 0x010
    static let RDHUP: UInt32 = 0x2000, ET: UInt32 = 1 << 31

    init(inbox: LoopInbox) {
        self.inbox = inbox
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        capacity = Int(min(limit.rlim_cur, 1 << 20))
        table = .allocate(capacity: capacity)
        table.initialize(repeating: nil, count: capacity)
        scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
        events = .allocate(capacity: Int(Self.maxEvents))
        epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epfd >= 0, "epoll_create1: \(errno)")
        var ev = epoll_event(events: Self.IN, data: epoll_data_t(fd: inbox.wakeFd))
        precondition(epoll_ctl(epfd, EPOLL_CTL_ADD, inbox.wakeFd, &ev) == 0, "epoll_ctl: \(errno)")
    }

    /// A new client socket: in the table and in epoll, for its whole life.
    func add(_ fd: Int32, _ conn: BenchConnection) -> Bool {
        guard Int(fd) < capacity else { return false }
        var ev = epoll_event(events: Self.IN | Self.OUT | Self.RDHUP | Self.ET, data: epoll_data_t(fd: fd))
        guard epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0 else { return false }
        table[Int(fd)] = conn
        if fd > highestFd { highestFd = fd }
        return true
    }

    /// Out of the table now; the descriptor is closed at the end of the turn (closing it
    /// also takes it out of epoll).
    func remove(_ fd: Int32) {
        table[Int(fd)] = nil
        doomed.append(fd)
    }

    func watchConnect(_ conn: BenchConnection, due: UInt64) {
        connecting.append((due, conn))
    }

    /// Runs `action` every `period` ns from `first` on, until cancelled.
    func every(_ period: UInt64, first: UInt64, _ action: @escaping () -> Void) -> Int {
        let id = nextTimerID
        nextTimerID += 1
        timers.append(Timer(id: id, due: first, period: period, action: action))
        return id
    }

    func cancel(_ id: Int) {
        timers.removeAll { $0.id == id }
    }

    // MARK: the loop

    func run(_ shard: LoopShard) {
        while !stopped { turn(shard) }
        for fd in 0...Int(highestFd) where table[fd] != nil {
            table[fd] = nil
            close(Int32(fd))
        }
        closeDoomed()
    }

    private func turn(_ shard: LoopShard) {
        var timeout: Int32 = -1
        if !timers.isEmpty || connectingHead < connecting.count {
            let now = monotonicNanos()
            var next = UInt64.max
            for t in timers where t.due < next { next = t.due }
            if connectingHead < connecting.count { next = min(next, connecting[connectingHead].due) }
            timeout = next <= now ? 0 : Int32(min((next - now + 999_999) / 1_000_000, 1000))
        }
        let n = epoll_wait(epfd, events, Self.maxEvents, timeout)
        if n < 0 {
            precondition(errno == EINTR, "epoll_wait: \(errno)")
            return
        }
        var tasks = false
        for i in 0..<Int(n) {
            let fd = events[i].data.fd
            if fd == inbox.wakeFd {
                tasks = true
            } else if let conn = table[Int(fd)] {
                conn.ready(events[i].events)
            }
        }
        if tasks {
            for task in inbox.take() { task(shard) }
        }
        if !timers.isEmpty || connectingHead < connecting.count { runTimers() }
        closeDoomed()
    }

    private func runTimers() {
        let now = monotonicNanos()
        // An action may add or cancel timers: look each due one up again by id.
        let dueIDs = timers.filter { $0.due <= now }.map(\.id)
        for id in dueIDs {
            guard let k = timers.firstIndex(where: { $0.id == id }) else { continue }
            let action = timers[k].action
            timers[k].due = max(timers[k].due + timers[k].period, now + 1)
            action()
        }
        while connectingHead < connecting.count {
            let (due, conn) = connecting[connectingHead]
            if conn.isConnecting && due > now { break }
            connectingHead += 1
            if conn.isConnecting { conn.connectTimedOut() }
        }
        if connectingHead > 4096 && connectingHead * 2 > connecting.count {
            connecting.removeFirst(connectingHead)
            connectingHead = 0
        }
    }

    private func closeDoomed() {
        guard !doomed.isEmpty else { return }
        for fd in doomed { close(fd) }
        doomed.removeAll(keepingCapacity: true)
    }
}
