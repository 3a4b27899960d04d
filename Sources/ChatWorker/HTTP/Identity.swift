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
        if let decided = authorizeAtOnce(origin: head.headers.first(name: "Origin"), target: target, origins: origins,
                                         verifier: verifier, guests: guests) {
            return loop.makeSucceededFuture(decided)
        }
        guard let verifier, let token = token(in: head, target: target) else {
            return loop.makeSucceededFuture(.failure(ProtocolError(.unauthorized, "a token is required (?token= or Authorization: Bearer)")))
        }
        let promise = loop.makePromise(of: Result<AuthorizedUser, AuthRefusal>.self)
        promise.completeWithTask { await verifier.verify(token) }
        return promise.futureResult.map { result in
            result.mapError { ProtocolError(.unauthorized, $0.reason) }
        }
    }

    /// The decision when it needs no waiting: nil when a token is to be verified.
    static func authorizeAtOnce(origin: String?, target: RequestTarget, origins: [String], verifier: TokenVerifier?,
                                guests: Bool = true) -> Result<AuthorizedUser, ProtocolError>? {
        if let refusal = originRefusal(origin, allowed: origins) { return .failure(refusal) }
        return verifier == nil ? fromQuery(target, guests: guests) : nil
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
        token(target: target, authorization: head.headers.first(name: "Authorization"))
    }

    static func token(target: RequestTarget, authorization: String?) -> String? {
        if let token = target.query["token"], !token.isEmpty { return String(token) }
        return bearer(authorization)
    }

    static func bearer(in head: HTTPRequestHead) -> String? {
        bearer(head.headers.first(name: "Authorization"))
    }

    /// The token of an `Authorization: Bearer` value.
    static func bearer(_ authorization: String?) -> String? {
        guard let value = authorization else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return String(parts[1].drop(while: \.isWhitespace))
    }

    /// `server.allowed_origins`: a browser's request whose Origin is not listed is refused.
    /// Requests without Origin come from non-browser clients, which Origin checks cannot
    /// protect against anyway (they would just send an allowed one); they pass.
    static func originRefusal(_ origin: String?, allowed: [String]) -> ProtocolError? {
        guard !allowed.isEmpty, let origin else { return nil }
        return allowed.contains(origin) ? nil : ProtocolError(.forbidden, "origin not allowed")
    }
}
