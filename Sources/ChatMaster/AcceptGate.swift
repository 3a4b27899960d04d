#if canImport(Glibc)
import Glibc
#endif
import ChatSystem

/// When one of the master's own listening sockets (control, metrics) may accept. At most
/// `maxClients` at once: more wait in the kernel's queue, so nobody who can reach the
/// metrics port can run the master out of the files it needs to restart children. And
/// nothing for a moment after accept() ran out of files or memory: the waiting
/// connection keeps the socket readable, and polling it then would spin the master
/// (the spin chatbench found in the workers).
struct AcceptGate {
    static let pause = 0.1

    let maxClients: Int
    private var pausedUntil = 0.0

    init(maxClients: Int) {
        self.maxClients = maxClients
    }

    /// When a pause ends, while one lasts: the master's poll must wake up for it.
    var resumesAt: Double? {
        pausedUntil > monotonicSeconds() ? pausedUntil : nil
    }

    /// Whether to poll the listening socket.
    func isOpen(clients: Int) -> Bool {
        clients < maxClients && monotonicSeconds() >= pausedUntil
    }

    /// The next waiting connection, while the gate is open.
    mutating func next(from listenFD: Int32, clients: Int) -> Int32? {
        guard isOpen(clients: clients) else { return nil }
        if let fd = Descriptors.acceptNonBlocking(listenFD) { return fd }
        if Descriptors.acceptFailedForWantOfResources(errno) { pausedUntil = monotonicSeconds() + Self.pause }
        return nil
    }
}
