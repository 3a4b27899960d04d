import ChatAuth
import ChatProtocol
import NIOCore
import NIOHTTP1

/// What an upgrade request is answered: the upgrade, with the response's extra headers
/// and who the connection is (none on the echo endpoint), or a refusal that the HTTP
/// handler writes.
enum UpgradeDecision: Sendable {
    case accept(HTTPHeaders, user: AuthorizedUser?)
    case refuse(ProtocolError)
}

/// Who a connection is, decided at the upgrade (`/ws`) or per request (`/sse`,
/// `/sse/send`, `/sse/history`): one rule for every chat entrance.
enum Identity {
    /// The decision on an upgrade at a chat endpoint.
    static func decide(_ head: HTTPRequestHead, target: RequestTarget, accepted headers: HTTPHeaders,
                       origins: [String], verifier: TokenVerifier?, on loop: any EventLoop) -> EventLoopFuture<UpgradeDecision> {
        authorize(head, target: target, origins: origins, verifier: verifier, on: loop).map { result in
            switch result {
            case .success(let user): .accept(headers, user: user)
            case .failure(let refusal): .refuse(refusal)
            }
        }
    }

    /// The Origin rule, then who the user is (auth mode `none`: `?user=`, else a guest when
    /// `guests` allows one; `jwt`: the token, verified off the loop).
    static func authorize(_ head: HTTPRequestHead, target: RequestTarget, origins: [String], verifier: TokenVerifier?,
                          guests: Bool = true, on loop: any EventLoop) -> EventLoopFuture<Result<AuthorizedUser, ProtocolError>> {
        if let refusal = originRefusal(head, allowed: origins) {
            return loop.makeSucceededFuture(.failure(refusal))
        }
        guard let verifier else {
            return loop.makeSucceededFuture(fromQuery(target, guests: guests))
        }
        guard let token = token(in: head, target: target) else {
            return loop.makeSucceededFuture(.failure(ProtocolError(.unauthorized, "a token is required (?token= or Authorization: Bearer)")))
        }
        let promise = loop.makePromise(of: Result<AuthorizedUser, AuthRefusal>.self)
        promise.completeWithTask { await verifier.verify(token) }
        return promise.futureResult.map { result in
            result.mapError { ProtocolError(.unauthorized, $0.reason) }
        }
    }

    /// Auth mode `none`: the `user` query parameter, or a generated guest name. A request
    /// that stands alone (`POST /sse/send`) gets no guest: a name new with every request
    /// would escape its per-user rate limit.
    static func fromQuery(_ target: RequestTarget, guests: Bool = true) -> Result<AuthorizedUser, ProtocolError> {
        guard let user = target.query["user"], !user.isEmpty else {
            guard guests else { return .failure(ProtocolError(.badUser, "POST /sse/send needs ?user= in auth mode none (its rate limit is per user)")) }
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

    /// `server.allowed_origins`: a browser's request whose Origin is not listed is refused.
    /// Requests without Origin come from non-browser clients, which Origin checks cannot
    /// protect against anyway (they would just send an allowed one); they pass.
    static func originRefusal(_ head: HTTPRequestHead, allowed: [String]) -> ProtocolError? {
        guard !allowed.isEmpty, let origin = head.headers.first(name: "Origin") else { return nil }
        return allowed.contains(origin) ? nil : ProtocolError(.forbidden, "origin not allowed")
    }
}
