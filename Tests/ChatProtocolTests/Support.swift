import Foundation
import NIOCore
import Testing
@testable import ChatProtocol

/// Decodes one request frame from its JSON text.
func decode(_ json: String, maxTextBytes: Int = 4096) -> Result<ClientMessage, ProtocolError> {
    ClientMessage.decode(ByteBuffer(string: json), maxTextBytes: maxTextBytes)
}

/// The error a request is refused with; records a failure and returns nil when it decodes.
func decodeError(_ json: String, maxTextBytes: Int = 4096, sourceLocation: SourceLocation = #_sourceLocation) -> ProtocolError? {
    refusal(decode(json, maxTextBytes: maxTextBytes), sourceLocation: sourceLocation)
}

/// The error of a refused decode; records a failure and returns nil when it decoded.
func refusal<Decoded>(_ result: Result<Decoded, ProtocolError>, sourceLocation: SourceLocation = #_sourceLocation) -> ProtocolError? {
    switch result {
    case .success(let decoded):
        Issue.record("expected an error, decoded \(decoded)", sourceLocation: sourceLocation)
        return nil
    case .failure(let error):
        return error
    }
}

/// The JSON text of one server frame.
func encoded(_ message: ServerMessage) -> String {
    var buffer = ByteBuffer()
    message.encode(into: &buffer)
    return String(buffer: buffer)
}

/// Parses JSON text with Foundation, as an independent check of what the writer produced.
func parsedObject(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
    let value = try JSONSerialization.jsonObject(with: Data(text.utf8))
    return try #require(value as? [String: Any], sourceLocation: sourceLocation)
}
