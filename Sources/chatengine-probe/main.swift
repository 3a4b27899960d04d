// chatengine-probe: ChatEngine speaking nchan's WebSocket protocol as chatbench's
// `--protocol nchan` expects it, to measure the engine against nginx+nchan.
//
//   chatengine-probe [--port P] [--workers N] [--defer-accept] [--max-queued BYTES]
//
// N worker processes (forked before anything starts a thread), each one epoll loop with a
// SO_REUSEPORT listener of its own. Processes rather than threads: a process may hold at most
// 20,000 descriptors here (docs/DESIGN.md), so 20,000 connections need two, as in chatgw and
// nginx. Each pair of workers shares a socketpair; a worker's publications for the others
// leave in one write per loop turn (one hop per batch). The first worker is this process;
// the others die with it (PR_SET_PDEATHSIG).
import ChatEngine
import CSystemShims
import Glibc

var port: UInt16 = 0
var workers = 2
var deferAccept = false
var config = LoopConfig()
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--port": port = UInt16(args.popFirst() ?? "") ?? 0
    case "--workers", "--threads": workers = max(1, Int(args.popFirst() ?? "") ?? 2)
    case "--defer-accept": deferAccept = true
    case "--max-queued": config.maxQueuedBytes = Int(args.popFirst() ?? "") ?? config.maxQueuedBytes
    default:
        say(2, "usage: chatengine-probe [--port P] [--workers N] [--defer-accept] [--max-queued BYTES]\n")
        exit(2)
    }
}
config.readOnAccept = deferAccept
signal(SIGPIPE, SIG_IGN)

func say(_ fd: Int32, _ s: String) {
    var s = s
    s.withUTF8 { _ = write(fd, $0.baseAddress!, $0.count) }
}

func check(_ r: Int32, _ what: String) {
    if r < 0 {
        say(2, "chatengine-probe: \(what): \(String(cString: strerror(errno)))\n")
        exit(1)
    }
}

/// One SO_REUSEPORT listener on 127.0.0.1:port (port 0: the kernel's choice, returned).
func listener(_ port: inout UInt16, deferAccept: Bool) -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    check(fd, "socket")
    var one: Int32 = 1
    check(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4), "SO_REUSEADDR")
    check(setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, 4), "SO_REUSEPORT")
    if deferAccept {
        var seconds: Int32 = 5
        check(setsockopt(fd, Int32(IPPROTO_TCP), TCP_DEFER_ACCEPT, &seconds, 4), "TCP_DEFER_ACCEPT")
    }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    check(withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }, "bind")
    check(withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }, "getsockname")
    port = UInt16(bigEndian: addr.sin_port)
    // The kernel caps the backlog at net.core.somaxconn (4096 here).
    check(listen(fd, 4096), "listen")
    return fd
}

let listeners = (0..<workers).map { _ in listener(&port, deferAccept: deferAccept) }
// links[i][j]: worker i's end of its stream to worker j.
var links = Array(repeating: Array(repeating: Int32(-1), count: workers), count: workers)
for i in 0..<workers {
    for j in (i + 1)..<max(i + 1, workers) {
        var pair: (Int32, Int32) = (-1, -1)
        check(withUnsafeMutableBytes(of: &pair) {
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0,
                       $0.baseAddress!.assumingMemoryBound(to: Int32.self))
        }, "socketpair")
        links[i][j] = pair.0
        links[j][i] = pair.1
    }
}
say(1, "chatengine-probe: ws://127.0.0.1:\(port) (/sub?room=R, /pub?room=R), \(workers) workers, pid \(getpid())\n")

var me = 0
for w in 1..<max(1, workers) {
    let pid = fork()
    check(pid, "fork")
    if pid == 0 {
        me = w
        _ = chatgw_set_parent_death_signal(SIGKILL)
        break
    }
}
for w in 0..<workers where w != me {
    close(listeners[w])
    for j in 0..<workers where j != w && links[w][j] >= 0 { close(links[w][j]) }
}
let loop = Loop(config: config)
let probe = PubSubProbe()
loop.application = probe
loop.addListener(listeners[me])
for j in 0..<workers where j != me { probe.addPeer(links[me][j], on: loop) }
loop.run()
