import ChatAuth
import ChatBus
import ChatEngine
import ChatProtocol
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// Plain HTTP on the gateway's listener: `/healthz`, the server-side API under `/api/`,
/// the built-in web page at `/`, the event stream transport under `/sse` (see
/// `EventStreamRoutes.swift`), and a clear answer to requests that are not a valid
/// WebSocket upgrade. (Accepted upgrades never reach this handler.)
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let worker: Worker
    /// The answer to the first request: the upgrade it asked for was refused.
    private var refusal: ProtocolError?
    private var request: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    /// The connection became an event stream: requests pipelined after it are not answered.
    var streaming = false

    init(worker: Worker, refusal: ProtocolError?) {
        self.worker = worker
        self.refusal = refusal
    }

    private var maximumBodyBytes: Int { PostedMessage.maximumBodyBytes(maxTextBytes: worker.settings.limits.maxTextBytes) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !streaming else { return }
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
        if let refusal {
            self.refusal = nil
            return refuse(context: context, head: head, refusal)
        }
        switch (head.method, path) {
        case (.GET, "/healthz"):
            send(context: context, head: head, HTTPAnswer(status: .ok, contentType: "text/plain; charset=utf-8", body: ByteBuffer(string: "ok\n")))
        case (.GET, "/") where worker.settings.config.server.webPage:
            send(context: context, head: head, HTTPAnswer(status: .ok, contentType: "text/html; charset=utf-8", body: ByteBuffer(string: WebPage.html)))
        case (_, "/ws"):
            refuse(context: context, head: head, .upgradeRequired)
        case (_, "/echo") where worker.settings.config.conformance.echo:
            refuse(context: context, head: head, .upgradeRequired)
        case (.GET, "/sse"):
            authorized(context: context, head: head, target: target) { [self] user in
                openEventStream(context: context, head: head, target: target, user: user)
            }
        case (.POST, "/sse/send"):
            authorized(context: context, head: head, target: target, guests: false) { [self] user in
                streamedSend(context: context, head: head, user: user)
            }
        case (.GET, "/sse/history"):
            authorized(context: context, head: head, target: target) { [self] user in
                streamHistory(context: context, head: head, target: target, user: user)
            }
        case _ where path.hasPrefix("/api/"):
            api(context: context, head: head, target: target)
        default:
            refuse(context: context, head: head, .notFound)
        }
    }

    // MARK: the server-side API

    private func api(context: ChannelHandlerContext, head: HTTPRequestHead, target: RequestTarget) {
        let key = worker.settings.config.api.key
        guard !key.isEmpty else {
            return refuse(context: context, head: head, ProtocolError(.notFound, "the HTTP API is off (api.key is empty)"))
        }
        guard let presented = Identity.bearer(in: head), APIKey.matches(presented, expected: key) else {
            return refuse(context: context, head: head, ProtocolError(.unauthorized, "a valid API key is required (Authorization: Bearer <api_key>)"))
        }
        let parts = target.path.split(separator: "/", omittingEmptySubsequences: false)
        // "", "api", "rooms", ROOM[, "messages"]
        guard parts.count >= 4, parts.count <= 5, parts[1] == "api", parts[2] == "rooms" else {
            return refuse(context: context, head: head, .notFound)
        }
        let room: String
        do {
            room = try Names.checkedRoom(String(parts[3].removingPercentEncoding))
        } catch {
            return refuse(context: context, head: head, error)
        }
        let isMessages = parts.count == 5 && parts[4] == "messages"
        switch (head.method, parts.count, isMessages) {
        case (.POST, 5, true): publish(context: context, head: head, room: room)
        case (.GET, 4, _): roomInfo(context: context, head: head, room: room)
        case (.GET, 5, true): messages(context: context, head: head, room: room, target: target)
        default:
            refuse(context: context, head: head, .notFound)
        }
    }

    /// The request's JSON body as `decode` reads it (given the text size limit), or nil once
    /// the request was refused: a body over `maximumBodyBytes`, or what `decode` refuses.
    func decodedBody<Decoded>(context: ChannelHandlerContext, head: HTTPRequestHead,
                              _ decode: (ByteBuffer, Int) -> Result<Decoded, ProtocolError>) -> Decoded? {
        guard !bodyTooLarge else {
            refuse(context: context, head: head, ProtocolError(.tooLarge, "body over \(maximumBodyBytes) bytes"))
            return nil
        }
        switch decode(body ?? ByteBuffer(), worker.settings.limits.maxTextBytes) {
        case .success(let decoded):
            return decoded
        case .failure(let error):
            refuse(context: context, head: head, error)
            return nil
        }
    }

    private func publish(context: ChannelHandlerContext, head: HTTPRequestHead, room: String) {
        guard let posted = decodedBody(context: context, head: head, PostedMessage.decode) else { return }
        worker.bus.publish(room: room, from: posted.from, text: posted.text) { [self] result in
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

    func messages(context: ChannelHandlerContext, head: HTTPRequestHead, room: String, target: RequestTarget) {
        let query: HistoryQuery
        switch HistoryQuery.decode(target.query.all) {
        case .success(let decoded): query = decoded
        case .failure(let error): return refuse(context: context, head: head, error)
        }
        worker.history(room: room, before: query.before, limit: query.limit) { [self] result in
            switch result {
            case .success(let page):
                var buffer = context.channel.allocator.buffer(capacity: 256)
                ServerMessage.history(room: room, messages: page.messages, more: page.more, ref: nil).encode(into: &buffer)
                send(context: context, head: head, HTTPAnswer(status: .ok, contentType: "application/json", body: buffer))
            case .failure:
                refuse(context: context, head: head, .busUnavailable)
            }
        }
    }

    // MARK: answers

    func refuse(context: ChannelHandlerContext, head: HTTPRequestHead, _ error: ProtocolError) {
        send(context: context, head: head, HTTPAnswer.refusal(error, allocator: context.channel.allocator))
    }

    func sendJSON(context: ChannelHandlerContext, head: HTTPRequestHead, fields: (inout JSONWriter) -> Void) {
        var json = JSONWriter(buffer: context.channel.allocator.buffer(capacity: 128))
        json.beginObject()
        fields(&json)
        json.endObject()
        send(context: context, head: head, HTTPAnswer(status: .ok, contentType: "application/json", body: json.buffer))
    }

    func send(context: ChannelHandlerContext, head: HTTPRequestHead, _ answer: HTTPAnswer) {
        let keepAlive = answer.keepsAlive(head)
        let response = HTTPResponseHead(version: head.version, status: answer.status, headers: answer.headers(keepAlive: keepAlive))
        context.write(wrapOutboundOut(.head(response)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(answer.body))), promise: nil)
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

/// A request target split into path and query.
struct RequestTarget {
    var path: Substring
    var query: Query

    init(_ uri: String) {
        guard let mark = uri.utf8.firstIndex(of: UInt8(ascii: "?")) else {
            path = uri[...]
            query = Query(raw: "")
            return
        }
        path = uri[..<mark]
        query = Query(raw: uri[uri.utf8.index(after: mark)...])
    }

    /// The query's parameters, found by scanning it when asked for: a request asks for two
    /// or three, and every handshake builds one, so no dictionary and no arrays of parts (a
    /// few allocations per handshake). `a=1&b=2`; a key without `=` has the value "", empty
    /// pairs are skipped, a repeated key's last value wins, values are percent-decoded.
    struct Query {
        var raw: Substring

        subscript(key: Substring) -> Substring? {
            var key = key
            return key.withUTF8 { wanted in
                var found: Substring?
                scan { name, value in
                    if name.elementsEqual(wanted) { found = Self.text(value) }
                }
                return found?.removingPercentEncoding
            }
        }

        /// Every parameter (for the rare request that reads them as a table).
        var all: [Substring: Substring] {
            var table: [Substring: Substring] = [:]
            scan { key, value in table[Self.text(key)] = Self.text(value).removingPercentEncoding }
            return table
        }

        /// Every `key=value` pair in order: the key's bytes and the value's, as they are in the
        /// URL (not decoded), valid during the call. Scans the query's bytes where they lie:
        /// walking a `Substring`'s UTF-8 view index by index, and a `Substring` for every key
        /// and value, were a few per cent of a handshake.
        func scan(_ body: (_ key: UnsafeBufferPointer<UInt8>, _ value: UnsafeBufferPointer<UInt8>) -> Void) {
            var raw = raw
            raw.withUTF8 { bytes in
                var start = 0
                while start < bytes.count {
                    var end = start, equals = -1
                    while end < bytes.count && bytes[end] != UInt8(ascii: "&") {
                        if equals < 0 && bytes[end] == UInt8(ascii: "=") { equals = end }
                        end += 1
                    }
                    if end > start {
                        let keyEnd = equals < 0 ? end : equals
                        body(UnsafeBufferPointer(rebasing: bytes[start..<keyEnd]),
                             UnsafeBufferPointer(rebasing: bytes[(equals < 0 ? end : equals + 1)..<end]))
                    }
                    start = end + 1
                }
            }
        }

        static func same(_ key: UnsafeBufferPointer<UInt8>, _ name: StaticString) -> Bool {
            UpgradeParser.equals(UnsafeRawBufferPointer(key), name)
        }

        /// A key's or value's bytes as text of its own (up to 15 bytes, no allocation).
        static func text(_ bytes: UnsafeBufferPointer<UInt8>) -> Substring {
            Substring(String(decoding: bytes, as: UTF8.self))
        }
    }
}

extension RequestTarget {
    /// `/ws?rooms=a,b[&history=N][&resume=room/epoch/seq,...]`: the joins a WebSocket client
    /// asked for in its URL, read as `GET /sse` reads its own (docs/PROTOCOL.md "Joining in
    /// the URL"), and handled right after `hello` as if the client had sent them.
    var openingJoins: [Result<ClientMessage, ProtocolError>] {
        // One pass for the three (every handshake asks), the last of a repeated key winning
        // as in `query[key]`.
        var rooms: Substring?, resume: Substring?, history: Substring?
        query.scan { key, value in
            if Query.same(key, "rooms") {
                rooms = Query.text(value)
            } else if Query.same(key, "resume") {
                resume = Query.text(value)
            } else if Query.same(key, "history") {
                history = Query.text(value)
            }
        }
        guard rooms != nil || resume != nil else { return [] }
        return EventStreamRequest.decode(rooms: rooms?.removingPercentEncoding, lastEventID: resume?.removingPercentEncoding,
                                         history: history?.removingPercentEncoding, resumeField: "resume").requests
    }
}

extension Substring {
    /// Decodes %XX escapes (and + as space); a malformed escape is kept as it is.
    var removingPercentEncoding: Substring {
        // A byte scan where the bytes lie: `contains("%")` would go through Foundation's
        // string search, and a generic scan of the UTF-8 view walks it index by index.
        var text = self
        let escaped = text.withUTF8 { bytes in bytes.contains { $0 == UInt8(ascii: "%") || $0 == UInt8(ascii: "+") } }
        guard escaped else { return self }
        let source = Array(utf8)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(source.count)
        var at = 0
        while at < source.count {
            let byte = source[at]
            if byte == UInt8(ascii: "+") {
                bytes.append(UInt8(ascii: " "))
            } else if byte == UInt8(ascii: "%"), at + 2 < source.count, let high = HexDigit.value(source[at + 1]),
                      let low = HexDigit.value(source[at + 2]) {
                bytes.append(high << 4 | low)
                at += 2
            } else {
                bytes.append(byte)
            }
            at += 1
        }
        return Substring(String(decoding: bytes, as: UTF8.self))
    }
}
