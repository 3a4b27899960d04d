import ChatProtocol
import NIOCore
import NIOHTTP1
import Testing
@testable import ChatWorker

/// The responses written without NIO's encoder, byte for byte as clients have always got them.
@Suite struct HTTPAnswerTests {
    @Test func overflowRefusalIs503WithRetryAfter() {
        var answer = HTTPAnswer.refusal(.workerFull, allocator: ByteBufferAllocator())
        answer.extraHeaders = [("Retry-After", "1")]
        let body = #"{"code":"unavailable","message":"this worker has no room for another connection; retry shortly"}"#
        #expect(String(buffer: answer.bytes(ByteBufferAllocator())) == "HTTP/1.1 503 Service Unavailable\r\n"
            + "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + body)
    }

    @Test func unparsableRequestIs400WithNoBody() {
        let answer = HTTPAnswer(status: .badRequest, body: ByteBuffer())
        #expect(String(buffer: answer.bytes(ByteBufferAllocator())) == "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }

    @Test func switchingProtocolsHead() {
        var headers = HTTPHeaders()
        headers.add(name: "Upgrade", value: "websocket")
        headers.add(name: "Sec-WebSocket-Accept", value: "abc=")
        var buffer = ByteBuffer()
        HTTPAnswer.writeHead(status: .switchingProtocols, headers: headers, into: &buffer)
        #expect(String(buffer: buffer) == "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc=\r\n\r\n")
    }

    @Test(arguments: [
        (ProtocolError.upgradeRequired, 426, "bad_request"), (.busUnavailable, 503, "unavailable"), (.notFound, 404, "not_found"),
        (ProtocolError(.badUser, "x"), 400, "bad_user"), (ProtocolError(.unauthorized, "x"), 401, "unauthorized"),
        (ProtocolError(.forbidden, "x"), 403, "forbidden"),
    ])
    func refusalStatusAndBody(_ error: ProtocolError, _ status: Int, _ code: String) {
        let answer = HTTPAnswer.refusal(error, allocator: ByteBufferAllocator())
        #expect(answer.status.code == status)
        #expect(answer.contentType == "application/json")
        #expect(String(buffer: answer.body).hasPrefix(#"{"code":"\#(code)","message":""#))
    }

    @Test func onlySuccessesKeepTheConnection() {
        let keepAlive = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
        var close = keepAlive
        close.headers.add(name: "Connection", value: "close")
        let ok = HTTPAnswer(status: .ok, contentType: "text/plain", body: ByteBuffer(string: "ok\n"))
        let refusal = HTTPAnswer.refusal(.notFound, allocator: ByteBufferAllocator())
        #expect(ok.keepsAlive(keepAlive))
        #expect(!ok.keepsAlive(close))
        #expect(!refusal.keepsAlive(keepAlive))
        #expect(ok.headers(keepAlive: true)["Connection"] == ["keep-alive"])
        #expect(refusal.headers(keepAlive: false)["Connection"] == ["close"])
    }
}
