#if canImport(Glibc)
import Glibc
#endif
import ChatControl
import ChatSystem
import Foundation

/// The master's control socket (a Unix socket, mode 0600; only its owner's processes may
/// talk to it), served from the supervision loop without blocking it: one JSON request
/// line per connection, one JSON answer line, close. Answers may come later (the relay
/// answers `rooms`), so a request is handed over with a `reply` to call once.
final class ControlServer {
    private struct Client {
        var buffer: [UInt8] = []
        let openedAt: Double
        /// Tells a late answer for a closed client from one for a new client on the same fd.
        let serial: UInt64
        var answered = false
    }

    private let listenFD: Int32
    private let path: String
    private var clients: [Int32: Client] = [:]
    /// How long a client may take to send its request.
    private let timeout = 5.0
    /// How long an answer may take (`rooms` waits for the relay): a request that is never
    /// answered must not hold one of the 64 places for ever. Shorter than chatctl's own
    /// 10 s, so that it shows this reason.
    private let answerTimeout = 8.0
    private var nextSerial: UInt64 = 0
    private var gate = AcceptGate(maxClients: 64)

    init(path: String) throws(SystemError) {
        self.path = path
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw SystemError("control socket path too long: \(path)", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
        }
        // Created 0600 from the start, not chmod'ed afterwards.
        let previous = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(previous)
        guard bound == 0, listen(fd, 64) == 0 else {
            let error = SystemError("bind \(path)")
            close(fd)
            throw error
        }
        listenFD = try Descriptors.moveAbove(fd)
    }

    var acceptResumesAt: Double? { gate.resumesAt }

    var pollDescriptors: [Int32] {
        (gate.isOpen(clients: clients.count) ? [listenFD] : []) + clients.filter { !$0.value.answered }.map(\.key)
    }

    /// Accepts and reads; calls `handle` for each complete request.
    func serve(handle: (ControlRequest, @escaping (ControlResponse) -> Void) -> Void) {
        acceptAll()
        let now = monotonicSeconds()
        for fd in Array(clients.keys) {
            guard var client = clients[fd] else { continue }
            if client.answered {
                if now - client.openedAt > answerTimeout {
                    finish(fd, serial: client.serial, with: .failure("no answer within \(Int(answerTimeout)) s"))
                }
                continue
            }
            if now - client.openedAt > timeout {
                finish(fd, serial: client.serial, with: .failure("timed out waiting for a request"))
                continue
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(fd, &chunk, chunk.count)
            if count == 0 || (count < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                drop(fd)
                continue
            }
            if count > 0 { client.buffer += chunk[0..<count] }
            clients[fd] = client
            guard let newline = client.buffer.firstIndex(of: UInt8(ascii: "\n")) else {
                if client.buffer.count > ControlProtocol.maximumRequestBytes {
                    finish(fd, serial: client.serial, with: .failure("request longer than \(ControlProtocol.maximumRequestBytes) bytes"))
                }
                continue
            }
            clients[fd]?.answered = true
            switch Self.parse(client.buffer[..<newline]) {
            case .failure(let refusal):
                finish(fd, serial: client.serial, with: refusal.response)
            case .success(let request):
                let serial = client.serial
                handle(request) { [weak self] response in self?.finish(fd, serial: serial, with: response) }
            }
        }
    }

    func closeAll() {
        for fd in clients.keys { close(fd) }
        clients.removeAll()
        close(listenFD)
        unlink(path)
    }

    private struct Refusal: Error {
        var response: ControlResponse
        init(_ message: String) { response = .failure(message) }
    }

    private static func parse(_ line: ArraySlice<UInt8>) -> Result<ControlRequest, Refusal> {
        struct Versioned: Decodable { var v: Int? }
        guard let versioned = try? JSONDecoder().decode(Versioned.self, from: Data(line)) else {
            return .failure(Refusal(#"not a JSON object; send e.g. {"v":1,"command":"status"}"#))
        }
        guard versioned.v == ControlProtocol.version else {
            return .failure(Refusal("unsupported control protocol version \(versioned.v.map(String.init) ?? "(none)"); this master speaks \(ControlProtocol.version)"))
        }
        do {
            return .success(try JSONDecoder().decode(ControlRequest.self, from: Data(line)))
        } catch {
            let commands = ControlCommand.allCases.map(\.rawValue).joined(separator: ", ")
            return .failure(Refusal("bad request: command must be one of \(commands)"))
        }
    }

    private func acceptAll() {
        while true {
            guard let fd = gate.next(from: listenFD, clients: clients.count) else { return }
            guard Self.peerIsTrusted(fd) else {
                close(fd)
                continue
            }
            nextSerial += 1
            clients[fd] = Client(openedAt: monotonicSeconds(), serial: nextSerial)
        }
    }

    /// The socket's mode already keeps others out; SO_PEERCRED makes sure of it.
    private static func peerIsTrusted(_ fd: Int32) -> Bool {
        guard let uid = Descriptors.peerUID(fd) else { return false }
        return uid == geteuid() || uid == 0
    }

    private func finish(_ fd: Int32, serial: UInt64, with response: ControlResponse) {
        guard clients[fd]?.serial == serial else { return }
        SocketWriter.writeAll(Self.encode(response), to: fd)
        drop(fd)
    }

    /// An answer as one JSON line, as chatctl --json and the status page read it.
    static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var bytes = Array((try? encoder.encode(value)) ?? Data())
        bytes.append(UInt8(ascii: "\n"))
        return bytes
    }

    private func drop(_ fd: Int32) {
        close(fd)
        clients[fd] = nil
    }
}

/// Writes a short answer to a non-blocking client socket: blocking, with a one-second
/// send timeout, so a client that does not read cannot hold the supervision loop.
enum SocketWriter {
    static func writeAll(_ bytes: [UInt8], to fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard written > 0 else { return }
            offset += written
        }
    }
}
