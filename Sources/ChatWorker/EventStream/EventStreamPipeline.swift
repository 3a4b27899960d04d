import NIOCore
import NIOHTTP1

/// The bottom of an event stream's pipeline. It writes the response head when it is put in
/// place, and drops whatever comes in afterwards: EventSource says nothing after its
/// request, so the session above only learns of the connection's end.
final class EventStreamInput: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The 200 that opens the stream. No Content-Length and no chunked framing: the body
    /// ends when the connection closes (`Connection: close`), so events go out as they are
    /// and one encoded event is the same bytes for every member of a room.
    static let head: ByteBuffer = {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/event-stream; charset=utf-8")
        headers.add(name: "Cache-Control", value: "no-store")
        // Asks nginx-like proxies not to hold events back in their buffers.
        headers.add(name: "X-Accel-Buffering", value: "no")
        headers.add(name: "Connection", value: "close")
        var buffer = ByteBuffer()
        HTTPAnswer.writeHead(status: .ok, headers: headers, into: &buffer)
        return buffer
    }()

    func handlerAdded(context: ChannelHandlerContext) {
        // Not flushed: the session's `hello` goes out in the same write(2).
        context.write(wrapOutboundOut(Self.head), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// Turns a connection whose request `GET /sse` was accepted into an event stream: the
/// stream's bottom and the session go in right above the request decoder (so their writes
/// reach the socket without passing any HTTP stage), then the HTTP stages and the decoder
/// come out. An idle stream keeps two stages, as an idle WebSocket keeps its own.
enum EventStreamPipeline {
    static func install(_ session: SessionHandler, from http: ChannelHandlerContext) throws {
        let pipeline = http.pipeline.syncOperations
        let decoder = try pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self)
        let input = EventStreamInput()
        try pipeline.addHandler(input, position: .after(decoder.handler))
        try pipeline.addHandler(session, position: .after(input))
        func remove<Stage: ChannelHandler>(_ stage: Stage.Type) {
            if let context = try? pipeline.context(handlerType: stage) { pipeline.removeHandler(context: context, promise: nil) }
        }
        remove(HTTPResponseEncoder.self)
        remove(HTTPServerPipelineHandler.self)
        remove(NIOHTTPResponseHeadersValidator.self)
        remove(HTTPServerProtocolErrorHandler.self)
        pipeline.removeHandler(context: http, promise: nil)
        pipeline.removeHandler(context: decoder, promise: nil)
    }
}
