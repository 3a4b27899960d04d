#if canImport(Glibc)
import Glibc
#endif
import ChatBus
import ChatProtocol
import ChatSystem
import NIOCore

// The relay's on-disk history (history.persist): an append-only journal of sequenced
// messages in the relay wire format (u32 length + `RelayFrame.message`), so that a relay
// restart keeps every room's epoch, seq and history. Appends are batched per loop tick
// into one write(2) to the page cache: a killed relay loses nothing already written; a
// machine crash may lose the last tick. The journal is rewritten from the rooms' held
// history when it has grown well past it, so it stays about as large as the history.

final class HistoryJournal {
    private let path: String
    private var fd: Int32 = -1
    private var pending: ByteBuffer
    private var appendedSinceCompaction = 0
    private let compactAfter: Int

    /// - Parameter compactAfter: rewrite once this many messages were appended.
    init(directory: String, compactAfter: Int) throws(SystemError) {
        path = directory + "/relay.journal"
        self.compactAfter = max(1_000, compactAfter)
        pending = ByteBufferAllocator().buffer(capacity: 4096)
        if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw SystemError("mkdir \(directory)") }
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)") }
    }

    /// Every message in the journal, in the order written. A torn or garbled tail (a
    /// crash mid-write, or garbage) ends the read; what came before it is kept.
    func load() -> (messages: [RoomMessage], discardedBytes: Int) {
        guard let bytes = Self.readAll(path) else { return ([], 0) }
        var buffer = ByteBufferAllocator().buffer(bytes: bytes)
        var messages: [RoomMessage] = []
        while let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self),
              buffer.readableBytes >= 4 + Int(length),
              var frame = buffer.getSlice(at: buffer.readerIndex + 4, length: Int(length)),
              case .message(let message)? = try? RelayFrame.decode(&frame) {
            messages.append(message)
            buffer.moveReaderIndex(forwardBy: 4 + Int(length))
        }
        return (messages, buffer.readableBytes)
    }

    func append(_ message: RoomMessage) {
        Self.writeRecord(message, into: &pending)
        appendedSinceCompaction += 1
    }

    var needsCompaction: Bool { appendedSinceCompaction >= compactAfter }

    /// Writes what this tick appended.
    func flush() {
        guard pending.readableBytes > 0 else { return }
        _ = pending.withUnsafeReadableBytes { write(fd, $0.baseAddress, $0.count) }
        pending.clear()
    }

    /// Replaces the journal with exactly `messages` (write to a temp file, then rename).
    func compact(keeping messages: [RoomMessage]) throws(SystemError) {
        flush()
        var buffer = ByteBufferAllocator().buffer(capacity: 64 * max(1, messages.count))
        for message in messages { Self.writeRecord(message, into: &buffer) }
        let temporary = path + ".tmp"
        let out = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard out >= 0 else { throw SystemError("open \(temporary)") }
        let written = buffer.withUnsafeReadableBytes { write(out, $0.baseAddress, $0.count) }
        close(out)
        guard written == buffer.readableBytes, rename(temporary, path) == 0 else { throw SystemError("rewrite \(path)") }
        close(fd)
        fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)") }
        appendedSinceCompaction = 0
    }

    private static func writeRecord(_ message: RoomMessage, into buffer: inout ByteBuffer) {
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        RelayFrame.message(message).encode(into: &buffer)
        buffer.setInteger(UInt32(buffer.writerIndex - lengthIndex - 4), at: lengthIndex)
    }

    private static func readAll(_ path: String) -> [UInt8]? {
        let input = open(path, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { return nil }
        defer { close(input) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = read(input, &chunk, chunk.count)
            guard count > 0 else { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return bytes
    }
}
