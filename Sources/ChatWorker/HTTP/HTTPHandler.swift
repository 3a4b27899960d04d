import NIOCore
import NIOHTTP1

/// Plain HTTP on the gateway's listener: `/healthz`, and a clear answer to requests
/// that are not a valid WebSocket upgrade. (Upgrades never reach this handler.)
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private var request: HTTPRequestHead?
    private let echoEnabled: Bool

    init(echoEnabled: Bool) {
        self.echoEnabled = echoEnabled
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            request = head
        case .body:
            break
        case .end:
            guard let head = request else { return }
            request = nil
            respond(context: context, to: head)
        }
    }

    private func respond(context: ChannelHandlerContext, to head: HTTPRequestHead) {
        let target = RequestTarget(head.uri)
        switch (head.method, target.path) {
        case (.GET, "/healthz"):
            send(context: context, head: head, status: .ok, body: "ok\n", contentType: "text/plain")
        case (_, "/ws"):
            if let problem = Identity.problem(in: target) {
                send(context: context, head: head, status: .badRequest, body: problem.jsonBody, contentType: "application/json")
            } else {
                send(context: context, head: head, status: .upgradeRequired,
                     body: #"{"code":"bad_request","message":"this endpoint takes a WebSocket upgrade"}"#, contentType: "application/json")
            }
        case (_, "/echo") where echoEnabled:
            send(context: context, head: head, status: .upgradeRequired,
                 body: #"{"code":"bad_request","message":"this endpoint takes a WebSocket upgrade"}"#, contentType: "application/json")
        default:
            send(context: context, head: head, status: .notFound, body: #"{"code":"not_found","message":"no such endpoint"}"#, contentType: "application/json")
        }
    }

    private func send(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, body: String, contentType: String) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        let keepAlive = head.isKeepAlive && status == .ok
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// A request target split into path and query parameters.
struct RequestTarget {
    var path: Substring
    var query: [Substring: Substring] = [:]

    init(_ uri: String) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        path = parts.first ?? ""
        guard parts.count == 2 else { return }
        for pair in parts[1].split(separator: "&") {
            let keyValue = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let value = keyValue.count == 2 ? keyValue[1] : ""
            query[keyValue[0]] = value.removingPercentEncoding
        }
    }
}

extension Substring {
    /// Decodes %XX escapes (and + as space); nil when an escape is malformed.
    var removingPercentEncoding: Substring {
        guard contains("%") || contains("+") else { return self }
        var bytes: [UInt8] = []
        var iterator = utf8.makeIterator()
        while let byte = iterator.next() {
            if byte == UInt8(ascii: "+") {
                bytes.append(UInt8(ascii: " "))
            } else if byte == UInt8(ascii: "%"), let high = iterator.next(), let low = iterator.next(),
                      let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16) {
                bytes.append(value)
            } else {
                bytes.append(byte)
            }
        }
        return Substring(String(decoding: bytes, as: UTF8.self))
    }
}
