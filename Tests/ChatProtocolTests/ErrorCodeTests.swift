import Foundation
import NIOCore
import Testing
@testable import ChatProtocol

/// docs/PROTOCOL.md "HTTP answers": every refusal's status and body.
@Suite struct HTTPRefusalMappingTests {
    @Test(arguments: [
        ("bad_user", 400), ("bad_json", 400), ("too_large", 400), ("bad_room", 400), ("unauthorized", 401),
        ("forbidden", 403), ("not_found", 404), ("bad_request", 426), ("unavailable", 503),
    ])
    func statusOfEachCodeSentOverHTTP(_ raw: String, _ status: Int) throws {
        let code = try #require(ErrorCode(rawValue: raw))
        #expect(code.httpStatus == status)
    }

    @Test func everyCodeIsAnHTTPError() {
        for code in ErrorCode.allCases {
            #expect((400..<600).contains(code.httpStatus), "\(code)")
        }
    }

    @Test func theHTTPOnlyCodesAreSpelledAsDocumented() {
        #expect(ErrorCode.badUser.rawValue == "bad_user")
        #expect(ErrorCode.unauthorized.rawValue == "unauthorized")
        #expect(ErrorCode.notFound.rawValue == "not_found")
        #expect(ErrorCode.badRequest.rawValue == "bad_request")
    }

    @Test func bodyIsCodeAndMessageOnly() throws {
        let error = ProtocolError(.tooLarge, #"text is "over" 5 bytes\ é"#, ref: "r1", room: "live:1")
        let body = String(buffer: error.httpBody(ByteBufferAllocator()))
        #expect(body == #"{"code":"too_large","message":"text is \"over\" 5 bytes\\ é"}"#)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: String])
        #expect(object == ["code": "too_large", "message": #"text is "over" 5 bytes\ é"#])
    }
}
