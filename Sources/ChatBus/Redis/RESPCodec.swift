import CHiredis
import NIOCore

// Redis speaks RESP. We do not parse or format it ourselves: hiredis's reader turns the
// bytes of a connection into reply objects and its formatter turns argument vectors into
// commands; these handlers only move bytes between NIO and hiredis.

/// One reply, copied out of hiredis's reply object (which is freed at once).
public indirect enum RedisValue: Sendable, Equatable {
    case string([UInt8])
    case integer(Int)
    case array([RedisValue])
    case null
    case status(String)
    case error(String)

    public var text: String? {
        switch self {
        case .string(let bytes): String(decoding: bytes, as: UTF8.self)
        case .status(let text): text
        case .integer(let value): String(value)
        default: nil
        }
    }

    public var integer: Int? {
        switch self {
        case .integer(let value): value
        case .string(let bytes): Int(String(decoding: bytes, as: UTF8.self))
        default: nil
        }
    }

    public var array: [RedisValue]? {
        if case .array(let values) = self { return values }
        return nil
    }

    init(reply: UnsafeMutablePointer<redisReply>) {
        let reply = reply.pointee
        switch reply.type {
        case chatgw_redis_reply_string():
            self = .string(Array(UnsafeRawBufferPointer(start: reply.str, count: reply.len)))
        case chatgw_redis_reply_integer():
            self = .integer(Int(reply.integer))
        case chatgw_redis_reply_array():
            var values: [RedisValue] = []
            values.reserveCapacity(reply.elements)
            for index in 0..<reply.elements {
                if let element = reply.element[index] { values.append(RedisValue(reply: element)) }
            }
            self = .array(values)
        case chatgw_redis_reply_status():
            self = .status(String(decoding: UnsafeRawBufferPointer(start: reply.str, count: reply.len), as: UTF8.self))
        case chatgw_redis_reply_error():
            self = .error(String(decoding: UnsafeRawBufferPointer(start: reply.str, count: reply.len), as: UTF8.self))
        default:
            self = .null
        }
    }
}

public struct RESPProtocolError: Error, CustomStringConvertible {
    public var description: String
}

/// Bytes in, `RedisValue`s out, through hiredis's reader. A protocol error (garbage
/// from the server) is reported through `errorCaught`; the connection is then useless.
final class RESPDecoder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = RedisValue

    private var reader: UnsafeMutablePointer<redisReader>?

    func handlerAdded(context: ChannelHandlerContext) {
        reader = redisReaderCreate()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        if let reader { redisReaderFree(reader) }
        reader = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let reader else { return }
        let buffer = unwrapInboundIn(data)
        let fed = buffer.withUnsafeReadableBytes { bytes in
            redisReaderFeed(reader, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
        }
        guard fed == REDIS_OK else { return fail(context) }
        while true {
            var reply: UnsafeMutableRawPointer?
            guard redisReaderGetReply(reader, &reply) == REDIS_OK else { return fail(context) }
            guard let reply else { return }
            let value = RedisValue(reply: reply.assumingMemoryBound(to: redisReply.self))
            freeReplyObject(reply)
            context.fireChannelRead(wrapInboundOut(value))
        }
    }

    private func fail(_ context: ChannelHandlerContext) {
        let message = reader.map { String(cString: chatgw_redis_reader_error($0)) } ?? "reader gone"
        if let reader { redisReaderFree(reader) }
        reader = nil
        context.fireErrorCaught(RESPProtocolError(description: "unreadable reply from Redis: \(message)"))
    }
}

/// An argument vector out, a RESP command in bytes, through hiredis's formatter.
final class RESPEncoder: ChannelOutboundHandler {
    typealias OutboundIn = [[UInt8]]
    typealias OutboundOut = ByteBuffer

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let command = Self.format(unwrapOutboundIn(data), allocator: context.channel.allocator)
        context.write(wrapOutboundOut(command), promise: promise)
    }

    static func format(_ arguments: [[UInt8]], allocator: ByteBufferAllocator) -> ByteBuffer {
        var pointers: [UnsafePointer<CChar>?] = []
        var lengths: [Int] = []
        var storage: [UnsafeMutablePointer<CChar>] = []
        defer { storage.forEach { $0.deallocate() } }
        for argument in arguments {
            let copy = UnsafeMutablePointer<CChar>.allocate(capacity: max(1, argument.count))
            argument.withUnsafeBytes { raw in
                if let base = raw.baseAddress { copy.withMemoryRebound(to: UInt8.self, capacity: argument.count) { $0.update(from: base.assumingMemoryBound(to: UInt8.self), count: argument.count) } }
            }
            storage.append(copy)
            pointers.append(UnsafePointer(copy))
            lengths.append(argument.count)
        }
        var target: UnsafeMutablePointer<CChar>?
        let length = redisFormatCommandArgv(&target, Int32(arguments.count), &pointers, lengths)
        defer { if let target { redisFreeCommand(target) } }
        var buffer = allocator.buffer(capacity: max(0, Int(length)))
        if let target, length > 0 {
            buffer.writeBytes(UnsafeRawBufferPointer(start: target, count: Int(length)))
        }
        return buffer
    }
}
