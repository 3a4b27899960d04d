import ChatProtocol
import NIOCore
import NIOHTTP1

/// Every HTTP response a worker sends, built in one place: the status, the headers
/// (`Content-Type`, `Content-Length`, any extra such as `Retry-After`, `Connection`) and
/// the body. `HTTPHandler` hands its head to NIO's encoder; where no encoder is in the
/// pipeline (the first request's handler, a socket taken only to be refused) `bytes`
/// writes the same response out.
struct HTTPAnswer {
    var status: HTTPResponseStatus
    var contentType: String?
    var extraHeaders: [(String, String)] = []
    var body: ByteBuffer

    /// A refusal: the code's status (docs/PROTOCOL.md "HTTP answers") and `{"code","message"}`.
    static func refusal(_ error: ProtocolError, allocator: ByteBufferAllocator) -> HTTPAnswer {
        HTTPAnswer(status: HTTPResponseStatus(statusCode: error.code.httpStatus), contentType: "application/json",
                   body: error.httpBody(allocator))
    }

    /// Whether the connection stays open after this answer: only a success, and only when
    /// the request asked for it. Every refusal closes the connection.
    func keepsAlive(_ request: HTTPRequestHead) -> Bool {
        request.isKeepAlive && status.code < 400
    }

    func headers(keepAlive: Bool) -> HTTPHeaders {
        var headers = HTTPHeaders()
        if let contentType { headers.add(name: "Content-Type", value: contentType) }
        headers.add(name: "Content-Length", value: "\(body.readableBytes)")
        for (name, value) in extraHeaders { headers.add(name: name, value: value) }
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        return headers
    }

    /// The whole response as HTTP/1.1 bytes, for a connection that is closed after it.
    func bytes(_ allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128 + body.readableBytes)
        Self.writeHead(status: status, headers: headers(keepAlive: false), into: &buffer)
        buffer.writeImmutableBuffer(body)
        return buffer
    }

    /// A status line and headers as HTTP/1.1 bytes, ending with the empty line.
    static func writeHead(status: HTTPResponseStatus, headers: HTTPHeaders, into buffer: inout ByteBuffer) {
        buffer.writeString("HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\n")
        for (name, value) in headers {
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("\r\n")
    }
}

extension ProtocolError {
    /// 426: a request to a WebSocket endpoint that is not a valid upgrade.
    static let upgradeRequired = ProtocolError(.badRequest, "this endpoint takes a WebSocket upgrade")
    static let busUnavailable = ProtocolError(.unavailable, "the message bus is unreachable; retry shortly")
    static let workerFull = ProtocolError(.unavailable, "this worker has no room for another connection; retry shortly")
    static let notFound = ProtocolError(.notFound, "no such endpoint")
}
