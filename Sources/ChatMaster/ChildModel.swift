#if canImport(Glibc)
import Glibc
#endif
import ChatLink
import ChatSystem

/// What kind of child a slot holds.
public enum ChildRole: String, Sendable, Codable {
    case worker
    case relay
    case archiver
}

/// A place in the wanted set: "worker 1", "relay 0". Restarts keep the slot.
public struct SlotID: Hashable, Sendable, CustomStringConvertible {
    public var role: ChildRole
    public var index: Int

    public var description: String { "\(role.rawValue) \(index)" }
}

/// The life of one child process, as the master sees it.
public enum ChildState: Sendable, Equatable {
    /// Spawned, not yet reported ready.
    case starting
    /// Serving.
    case running
    /// Asked to stop; killed if still alive at `deadline`.
    case draining(deadline: Double)

    /// As `chatctl status` shows it.
    var name: String {
        switch self {
        case .starting: "starting"
        case .running: "running"
        case .draining: "draining"
        }
    }
}

/// One child process the master spawned and has not reaped yet: its link and what it
/// last reported. Its state, as supervision sees it, is in the `SlotTable`.
final class Child {
    let pid: pid_t
    let slot: SlotID
    let generation: Int
    let linkFD: Int32
    let startedAt: Double
    var stats = ChildStats()
    /// Per-second rates from the last two heartbeats.
    var rates = (messagesIn: 0.0, messagesOut: 0.0)
    /// Bus round trips per latency bucket between the last two heartbeats.
    var latencyIncrease: [Int] = []
    var framer = LineFramer()

    init(pid: pid_t, slot: SlotID, generation: Int, linkFD: Int32, startedAt: Double) {
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.linkFD = linkFD
        self.startedAt = startedAt
    }

    func send(_ message: LinkMessage) {
        let line = message.encodedLine()
        // The link is tiny and low-rate; a child that does not read it is killed by the watchdog.
        _ = line.withUnsafeBytes { Glibc.send(linkFD, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }
}
