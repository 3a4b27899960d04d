import ChatAuth
import ChatBus
import ChatProtocol
import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// Plain HTTP on the gateway's listener: `/healthz`, the server-side API under `/api/`,
/// the built-in web page at `/`, and a clear answer to requests that are not a valid
/// WebSocket upgrade. (Accepted upgrades never reach this handler.)
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let worker: Worker
    private let verdict: UpgradeVerdict
    private var request: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false

    init(worker: Worker, verdict: UpgradeVerdict) {
        self.worker = worker
        self.verdict = verdict
    }

    /// An API body may hold `text` of the maximum size, escaped, plus a little JSON around it.
    private var maximumBodyBytes: Int { worker.settings.limits.maxTextBytes * 6 + 1024 }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            request = head
            body = nil
            bodyTooLarge = false
        case .body(var chunk):
            guard !bodyTooLarge else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > maximumBodyBytes {
                bodyTooLarge = true
                body = nil
            } else if body == nil {
                body = chunk
            } else {
                body!.writeBuffer(&chunk)
            }
        case .end:
            guard let head = request else { return }
            request = nil
            route(context: context, head: head)
        }
    }

    private func route(context: ChannelHandlerContext, head: HTTPRequestHead) {
        let target = RequestTarget(head.uri)
        let path = target.path
        if let refusal = verdict.refusal {
            verdict.refusal = nil
            return refuse(context: context, head: head, refusal)
        }
        switch (head.method, path) {
        case (.GET, "/healthz"):
            send(context: context, head: head, status: .ok, body: "ok\n", contentType: "text/plain; charset=utf-8")
        case (.GET, "/") where worker.settings.config.server.webPage:
            send(context: context, head: head, status: .ok, body: WebPage.html, contentType: "text/html; charset=utf-8")
        case (_, "/ws"):
            refuse(context: context, head: head, .upgradeRequired)
        case (_, "/echo") where worker.settings.config.conformance.echo:
            refuse(context: context, head: head, .upgradeRequired)
        case _ where path.hasPrefix("/api/"):
            api(context: context, head: head, target: target)
        default:
            refuse(context: context, head: head, HTTPRefusal(status: .notFound, code: "not_found", message: "no such endpoint"))
        }
    }

    // MARK: the server-side API

    private func api(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget) {
        let key = worker.settings.config.api.key
        guard !key.isEmpty else {
            return refuse(context: context, head: head, HTTPRefusal(status: .notFound, code: "not_found", message: "the HTTP API is off (api.key is empty)"))
        }
        guard let presented = Identity.bearer(in: head), APIKey.matches(presented, expected: key) else {
            return refuse(context: context, head: head, HTTPRefusal(status: .unauthorized, code: "unauthorized", message: "a valid API key is required (Authorization: Bearer <api_key>)"))
        }
        let parts = target.path.split(separator: "/", omittingEmptySubsequences: false)
        // "", "api", "rooms", ROOM[, "messages"]
        guard parts.count >= 4, parts.count <= 5, parts[1] == "api", parts[2] == "rooms" else {
            return refuse(context: context, head: head, HTTPRefusal(status: .notFound, code: "not_found", message: "no such endpoint"))
        }
        let room = String(parts[3].removingPercentEncoding)
        guard Names.isValidRoom(room) else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "bad_room", message: "room names are 1 to 64 characters from [A-Za-z0-9_.:-]"))
        }
        let isMessages = parts.count == 5 && parts[4] == "messages"
        switch (head.method, parts.count, isMessages) {
        case (.POST, 5, true): publish(context: context, head: head, room: room)
        case (.GET, 4, _): roomInfo(context: context, head: head, room: room)
        case (.GET, 5, true): messages(context: context, head: head, room: room, target: target)
        default:
            refuse(context: context, head: head, HTTPRefusal(status: .notFound, code: "not_found", message: "no such endpoint"))
        }
    }

    private func publish(context: ChannelHandlerContext, head: HTTPRequestHead, room: String) {
        guard !bodyTooLarge else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "too_large", message: "body over \(maximumBodyBytes) bytes"))
        }
        let limit = worker.settings.limits.maxTextBytes
        guard let body, let object = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any] else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "bad_json", message: #"the body must be a JSON object {"text": ..., "from": ...}"#))
        }
        guard let text = object["text"] as? String else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "bad_json", message: #"field "text" must be a string"#))
        }
        guard text.utf8.count <= limit else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "too_large", message: "text is over \(limit) bytes"))
        }
        let from = object["from"] == nil || object["from"] is NSNull ? "system" : object["from"] as? String ?? ""
        guard Names.isValidUser(from) else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "bad_user", message: #"field "from" must be 1 to 32 characters from [A-Za-z0-9_.-]"#))
        }
        worker.bus.publish(room: room, from: from, text: text) { [self] result in
            switch result {
            case .success(let published):
                sendJSON(context: context, head: head) { json in
                    json.field("room", room)
                    json.field("seq", published.seq)
                    json.field("epoch", published.epoch)
                }
            case .failure:
                refuse(context: context, head: head, .busUnavailable)
            }
        }
    }

    private func roomInfo(context: ChannelHandlerContext, head: HTTPRequestHead, room: String) {
        worker.bus.info(room: room) { [self] result in
            switch result {
            case .success(let snapshot):
                sendJSON(context: context, head: head) { json in
                    json.field("room", room)
                    json.field("seq", snapshot.seq)
                    json.field("epoch", snapshot.epoch)
                    json.field("members", snapshot.members)
                }
            case .failure:
                refuse(context: context, head: head, .busUnavailable)
            }
        }
    }

    private func messages(context: ChannelHandlerContext, head: HTTPRequestHead, room: String, target: RequestTarget) {
        var before: HistoryPosition?
        if let epoch = target.query["before_epoch"], let seq = target.query["before_seq"].flatMap({ Int($0) }), seq >= 0 {
            before = HistoryPosition(epoch: String(epoch), seq: seq)
        }
        let limit = target.query["limit"].map { Int($0) ?? 0 } ?? 50
        guard (1...200).contains(limit) else {
            return refuse(context: context, head: head, HTTPRefusal(status: .badRequest, code: "bad_json", message: "limit must be an integer from 1 to 200"))
        }
        worker.history(room: room, before: before, limit: limit) { [self] result in
            switch result {
            case .success(let page):
                var buffer = context.channel.allocator.buffer(capacity: 256)
                ServerMessage.history(room: room, messages: page.messages, more: page.more, ref: nil).encode(into: &buffer)
                send(context: context, head: head, status: .ok, body: buffer, contentType: "application/json")
            case .failure:
                refuse(context: context, head: head, .busUnavailable)
            }
        }
    }

    // MARK: answers

    private func refuse(context: ChannelHandlerContext, head: HTTPRequestHead, _ refusal: HTTPRefusal) {
        sendJSON(context: context, head: head, status: refusal.status) { json in refusal.writeFields(into: &json) }
    }

    private func sendJSON(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus = .ok, fields: (inout JSONWriter) -> Void) {
        var json = JSONWriter(buffer: context.channel.allocator.buffer(capacity: 128))
        json.beginObject()
        fields(&json)
        json.endObject()
        send(context: context, head: head, status: status, body: json.buffer, contentType: "application/json")
    }

    private func send(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, body: String, contentType: String) {
        send(context: context, head: head, status: status, body: context.channel.allocator.buffer(string: body), contentType: contentType)
    }

    private func send(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, body: ByteBuffer, contentType: String) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.readableBytes)")
        let keepAlive = head.isKeepAlive && status.code < 400
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // Malformed requests (and heads over NIO's 80 KiB limit) were already answered
        // 400 by NIO's protocol error handler.
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
    /// Decodes %XX escapes (and + as space); a malformed escape is kept as it is.
    var removingPercentEncoding: Substring {
        // A byte scan: `contains("%")` would go through Foundation's string search here.
        guard utf8.contains(where: { $0 == UInt8(ascii: "%") || $0 == UInt8(ascii: "+") }) else { return self }
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
