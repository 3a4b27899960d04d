import ChatAuth
import ChatProtocol
import NIOCore
import NIOHTTP1

/// What the upgrade decided about one connection. The upgrader writes it; the HTTP
/// handler reads it when the upgrade was refused, the session when it went through.
final class UpgradeVerdict {
    var user: AuthorizedUser?
    var refusal: ProtocolError?
}

/// Who a connection is, decided at the upgrade.
enum Identity {
    /// Auth mode `none`: the `user` query parameter, or a generated guest name.
    static func fromQuery(_ target: RequestTarget) -> Result<AuthorizedUser, ProtocolError> {
        guard let user = target.query["user"], !user.isEmpty else {
            return .success(AuthorizedUser(name: "guest-" + String(UInt32.random(in: 0...UInt32.max), radix: 16), rooms: .any))
        }
        return Result { () throws(ProtocolError) in AuthorizedUser(name: try Names.checkedUser(user), rooms: .any) }
    }

    /// Auth mode `jwt`: the token from `?token=` or `Authorization: Bearer`.
    static func token(in head: HTTPRequestHead, target: RequestTarget) -> String? {
        if let token = target.query["token"], !token.isEmpty { return String(token) }
        return bearer(in: head)
    }

    static func bearer(in head: HTTPRequestHead) -> String? {
        guard let value = head.headers.first(name: "Authorization") else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return String(parts[1].drop(while: \.isWhitespace))
    }

    /// `server.allowed_origins`: a browser's upgrade whose Origin is not listed is refused.
    /// Requests without Origin come from non-browser clients, which Origin checks cannot
    /// protect against anyway (they would just send an allowed one); they pass.
    static func originRefusal(_ head: HTTPRequestHead, allowed: [String]) -> ProtocolError? {
        guard !allowed.isEmpty, let origin = head.headers.first(name: "Origin") else { return nil }
        return allowed.contains(origin) ? nil : ProtocolError(.forbidden, "origin not allowed")
    }
}
