import ChatProtocol
import NIOCore

/// Why a bus request did not go through.
public enum BusError: Error, Sendable, Equatable {
    /// The bus is down or the link dropped while the request was in flight: retry.
    case unavailable
}

/// The answer to a join: the room's state, what to replay, and what cannot be replayed.
public struct JoinResult: Sendable, Equatable {
    public var room: RoomSnapshot
    public var replay: [RoomMessage]
    public var gap: Gap?

    public init(room: RoomSnapshot, replay: [RoomMessage], gap: Gap?) {
        self.room = room
        self.replay = replay
        self.gap = gap
    }
}

/// A message's place once the bus sequenced it.
public struct Published: Sendable, Equatable {
    public var seq: Int
    public var epoch: String

    public init(seq: Int, epoch: String) {
        self.seq = seq
        self.epoch = epoch
    }
}

/// What a worker hears from its bus, on the worker's event loop.
public protocol BusDelegate: AnyObject {
    /// A live message of a room this worker has members in, in seq order per room.
    func bus(received message: RoomMessage)
    /// The bus is (again) reachable: re-join the rooms that have members.
    func busConnected()
    /// The bus went away; requests fail with `.unavailable` until `busConnected`.
    func busLost()
}

/// The worker's side of the bus (the relay, or Redis). Every call and callback happens on
/// the worker's event loop; answers come in the order the requests were made.
///
/// The order a worker may rely on, per room (the bus client owns it; the worker keeps no
/// seam logic of its own):
/// - live messages come once each, in seq order within an epoch;
/// - a join's answer comes at its place in that stream: every message up to the answer's
///   `seq` was delivered before it (or, when this worker was not receiving the room yet,
///   is in the answer's replay or before it), and every later one comes after it;
/// - a publish is answered after its own message was delivered (when this worker has
///   members in the room).
public protocol Bus: AnyObject {
    var delegate: BusDelegate? { get set }
    var isAvailable: Bool { get }

    /// Starts connecting, and reconnecting whenever the link drops (for the life of the
    /// process).
    func start()

    /// Counts `members` more local members of `room` and answers with its state. Every
    /// message of the room with a seq above the answer's `seq` is delivered afterwards.
    func join(room: String, since: Int?, epoch: String?, history: Int, members: Int,
              completion: @escaping (Result<JoinResult, BusError>) -> Void)
    /// Counts `members` fewer local members of `room`.
    func leave(room: String, members: Int)
    /// Sequences and fans out a message. The message itself is delivered (to this worker
    /// too, if it has members there) before the completion runs.
    func publish(room: String, from: String, text: String, completion: @escaping (Result<Published, BusError>) -> Void)
    /// A room's state (seq, epoch, members over all workers) without joining it.
    func info(room: String, completion: @escaping (Result<RoomSnapshot, BusError>) -> Void)
    /// Older messages for scroll-back.
    func fetch(room: String, before: HistoryPosition?, limit: Int,
               completion: @escaping (Result<(messages: [RoomMessage], more: Bool), BusError>) -> Void)
}

/// The archiver's side of the bus: everything a worker's has, and every room at once.
public protocol ArchiverBus: Bus {
    /// Every message of every room from now on, until the link drops.
    func subscribeAll()
    /// The names of the rooms the bus holds a sequence for.
    func listRooms(completion: @escaping (Result<[String], BusError>) -> Void)
}
