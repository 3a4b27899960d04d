import ChatProtocol
import NIOCore
import NIOWebSocket

/// A complete, valid application message from the client.
public enum WebSocketMessage {
    case text(ByteBuffer)
    case binary(ByteBuffer)
}

/// The RFC 6455 duties NIO leaves to the application: answers pings, runs the close
/// handshake in both directions, refuses reserved bits and invalid UTF-8, and maps
/// decoder errors to close codes. Above it, the pipeline sees only whole messages.
///
/// It is inbound-only on purpose: the stage above writes pre-framed bytes that go
/// straight to the socket without passing through here (one handler less per delivery),
/// starts a close with `close(code:)`, and learns through `onClosing` that no more may
/// be written.
final class WebSocketHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = WebSocketMessage
    typealias OutboundOut = ByteBuffer

    private enum State {
        case open
        /// We sent a close frame and wait for the peer's.
        case closeSent
        case closed
    }

    /// How long we wait for the peer to answer our close frame before dropping TCP.
    static let closeHandshakeTimeout = TimeAmount.seconds(2)

    private var state = State.open {
        didSet {
            if case .open = oldValue, let onClosing {
                self.onClosing = nil
                onClosing()
            }
        }
    }
    private var context: ChannelHandlerContext?
    /// Where this connection's activity is logged (its row), told of every frame that
    /// comes in; set by the stage above when it wants the connection swept for idleness
    /// (sessions; the echo endpoint is not).
    var activity: (log: ActivityLog, row: Int)?
    /// Called once, when the connection stops being open (a close sent or received, or a
    /// protocol error): nothing more may be written after the close frame.
    var onClosing: (() -> Void)?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        onClosing = nil
    }

    /// Starts the close handshake with `code` (after a `bye`, an idle timeout).
    func close(code: UInt16) {
        guard let context else { return }
        sendClose(context: context, code: code)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if let activity { activity.log.heard(activity.row, at: .now()) }
        switch frame.opcode {
        case .connectionClose:
            receivedClose(context: context, frame: frame)
        case .ping:
            guard case .open = state else { return }
            guard frame.fin, frame.length <= 125 else { return fail(context: context, code: CloseCode.protocolError) }
            context.writeAndFlush(wrapOutboundOut(FrameBytes.make(opcode: .pong, payload: frame.unmaskedData, allocator: context.channel.allocator)), promise: nil)
        case .pong:
            break
        case .text:
            guard case .open = state else { return }
            let payload = frame.unmaskedData
            guard payload.readableBytesView.isValidUTF8 else {
                return fail(context: context, code: CloseCode.invalidUTF8)
            }
            context.fireChannelRead(wrapInboundOut(.text(payload)))
        case .binary:
            guard case .open = state else { return }
            context.fireChannelRead(wrapInboundOut(.binary(frame.unmaskedData)))
        default:
            fail(context: context, code: CloseCode.protocolError)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch error {
        case NIOWebSocketError.invalidFrameLength,
             NIOWebSocketFrameAggregator.Error.tooManyFragments,
             NIOWebSocketFrameAggregator.Error.accumulatedFrameSizeIsTooLarge:
            fail(context: context, code: CloseCode.tooBig)
        case is NIOWebSocketError, is NIOWebSocketFrameAggregator.Error, is ByteToMessageDecoderError, is FrameRuleViolation:
            fail(context: context, code: CloseCode.protocolError)
        default:
            context.close(promise: nil)
        }
    }

    private func receivedClose(context: ChannelHandlerContext, frame: WebSocketFrame) {
        switch state {
        case .open:
            var payload = frame.unmaskedData
            let code = Self.validatedCloseCode(&payload)
            state = .closed
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(FrameBytes.close(code: code, allocator: channel.allocator)))
                .whenComplete { _ in channel.close(promise: nil) }
        case .closeSent:
            state = .closed
            context.close(promise: nil)
        case .closed:
            break
        }
    }

    /// The code to echo: the peer's if it is valid, 1002 if the close frame is malformed.
    private static func validatedCloseCode(_ payload: inout ByteBuffer) -> UInt16 {
        if payload.readableBytes == 0 { return CloseCode.normal }
        guard payload.readableBytes >= 2, let code = payload.readInteger(as: UInt16.self),
              payload.readableBytesView.isValidUTF8, isValidReceivedCloseCode(code) else {
            return CloseCode.protocolError
        }
        return code
    }

    private static func isValidReceivedCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1011, 3000...4999: true
        default: false
        }
    }

    /// Fails the connection (RFC 6455 7.1.7): a close frame with `code`, then the TCP
    /// connection closes without waiting for the peer, whose further bytes are garbage.
    private func fail(context: ChannelHandlerContext, code: UInt16) {
        guard case .open = state else {
            context.close(promise: nil)
            return
        }
        state = .closed
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(FrameBytes.close(code: code, allocator: channel.allocator)))
            .whenComplete { _ in channel.close(promise: nil) }
    }

    private func sendClose(context: ChannelHandlerContext, code: UInt16) {
        guard case .open = state else { return }
        state = .closeSent
        context.writeAndFlush(wrapOutboundOut(FrameBytes.close(code: code, allocator: context.channel.allocator)), promise: nil)
        let channel = context.channel
        context.eventLoop.scheduleTask(in: Self.closeHandshakeTimeout) {
            channel.close(promise: nil)
        }
    }
}

/// A frame that breaks a rule of RFC 6455 that NIO's decoder does not check.
struct FrameRuleViolation: Error {}

/// Checks every frame as it arrives, before fragments are joined (which drops the mask
/// and reserved bits): no extension is negotiated, so reserved bits are a protocol
/// error, and (RFC 6455 5.1) a server must fail a connection whose frames are unmasked.
/// Then hands the frame to NIO's aggregator, which it holds rather than giving it a
/// pipeline stage of its own (a stage costs every idle connection a context): the
/// aggregator fires its whole messages and errors through this stage's context.
final class FrameRuleChecker: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = WebSocketFrame
    private let aggregator: NIOWebSocketFrameAggregator
    private var failed = false

    init(aggregator: NIOWebSocketFrameAggregator) {
        self.aggregator = aggregator
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let frame = unwrapInboundIn(data)
        guard !frame.rsv1, !frame.rsv2, !frame.rsv3, frame.maskKey != nil else {
            failed = true
            return context.fireErrorCaught(FrameRuleViolation())
        }
        aggregator.channelRead(context: context, data: data)
    }
}

extension ByteBufferView {
    var isValidUTF8: Bool {
        withContiguousStorageIfAvailable { String(validating: $0, as: UTF8.self) != nil }
            ?? (String(validating: Array(self), as: UTF8.self) != nil)
    }
}
