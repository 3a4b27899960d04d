import ChatAuth
import Foundation

/// What the master's HTTP listener (`metrics.listen`) serves, decided from the request
/// head alone, so that the rules are tested without a socket.
enum MasterPage: Equatable {
    /// Prometheus text. Open to whoever reaches the port, as scrapers expect.
    case metrics
    /// The operator's status page and the JSON it polls: behind `api.key` when one is set,
    /// since they name rooms and process ids.
    case statusPage
    case statusJSON
}

enum MasterRoute: Equatable {
    case page(MasterPage)
    case unauthorized
    case notFound

    /// `head` is the request up to its blank line; `apiKey` is `api.key` ("" means none).
    static func of(head: String, apiKey: String) -> MasterRoute {
        let lines = head.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
        let requestLine = lines.first.map(String.init) ?? ""
        let parts = requestLine.split(separator: " ")
        guard parts.count >= 2, parts[0] == "GET" else { return .notFound }
        let path = parts[1].split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let page: MasterPage
        switch path {
        case "/metrics": page = .metrics
        case "/status": page = .statusPage
        case "/status.json": page = .statusJSON
        default: return .notFound
        }
        guard page != .metrics, !apiKey.isEmpty else { return .page(page) }
        let authorization = lines.dropFirst().lazy.compactMap { Self.value(ofHeader: "authorization", in: $0) }.first
        guard let presented = authorization.flatMap(Self.presentedKey), APIKey.matches(presented, expected: apiKey) else {
            return .unauthorized
        }
        return .page(page)
    }

    /// `Bearer KEY` as the HTTP API takes it, or `Basic` with the key as the password (any
    /// user name): the browser's own login prompt sends that, and then re-sends it with
    /// every poll the page makes, so the key never has to be in a URL or in the page.
    static func presentedKey(_ authorization: String) -> String? {
        let parts = authorization.split(separator: " ", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        let scheme = parts[0].lowercased(), credentials = parts[1].trimmingCharacters(in: .whitespaces)
        if scheme == "bearer" { return credentials }
        guard scheme == "basic", let data = Data(base64Encoded: credentials),
              let pair = String(data: data, encoding: .utf8), let colon = pair.firstIndex(of: ":") else { return nil }
        return String(pair[pair.index(after: colon)...])
    }

    private static func value(ofHeader name: String, in line: Substring) -> String? {
        guard let colon = line.firstIndex(of: ":"), line[..<colon].lowercased() == name else { return nil }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
}

/// One answer of the master's HTTP listener.
struct MasterAnswer {
    var status: String
    var contentType: String
    var body: [UInt8]
    var extraHeaders: [String] = []

    static func ok(_ contentType: String, _ body: [UInt8]) -> MasterAnswer {
        MasterAnswer(status: "200 OK", contentType: contentType, body: body, extraHeaders: ["Cache-Control: no-store"])
    }

    static let notFound = MasterAnswer(status: "404 Not Found", contentType: "text/plain", body: Array("not found\n".utf8))

    /// The Basic challenge makes a browser ask for the key (as the password) and then send
    /// it with the page's polls; scripts send `Authorization: Bearer` without asking.
    static let unauthorized = MasterAnswer(
        status: "401 Unauthorized", contentType: "application/json",
        body: Array((#"{"code":"unauthorized","message":"this page needs api.key: Authorization: Bearer <key>, or Basic with the key as the password"}"# + "\n").utf8),
        extraHeaders: [#"WWW-Authenticate: Basic realm="chatgw status", charset="UTF-8""#])

    var bytes: [UInt8] {
        let head = (["HTTP/1.1 \(status)", "Content-Type: \(contentType)", "Content-Length: \(body.count)", "Connection: close"]
            + extraHeaders).joined(separator: "\r\n") + "\r\n\r\n"
        return Array(head.utf8) + body
    }
}
