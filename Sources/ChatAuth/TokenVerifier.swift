import ChatProtocol
import Foundation
import JWTKit

/// The claims chatgw reads from a client's JWT (HS256).
public struct ChatClaims: JWTPayload, Equatable {
    /// The user name; must follow the protocol's user name rule.
    public var sub: SubjectClaim
    public var exp: ExpirationClaim
    /// Rooms the user may join: exact names, or prefixes ending in `*`. Absent: any room.
    public var rooms: [String]?

    public init(sub: String, exp: Date, rooms: [String]?) {
        self.sub = SubjectClaim(value: sub)
        self.exp = ExpirationClaim(value: exp)
        self.rooms = rooms
    }

    public func verify(using algorithm: some JWTAlgorithm) async throws {
        try exp.verifyNotExpired()
    }
}

/// Who a connection is and where it may go, decided at the upgrade.
public struct AuthorizedUser: Sendable, Equatable {
    public var name: String
    public var rooms: RoomPermission

    public init(name: String, rooms: RoomPermission) {
        self.name = name
        self.rooms = rooms
    }
}

/// The `rooms` claim: any room, or a list of names and `prefix*` patterns.
public enum RoomPermission: Sendable, Equatable {
    case any
    case only([String])

    public func allows(_ room: String) -> Bool {
        switch self {
        case .any:
            return true
        case .only(let patterns):
            return patterns.contains { pattern in
                pattern.hasSuffix("*") ? room.hasPrefix(pattern.dropLast()) : room == pattern
            }
        }
    }
}

/// Why a token was refused (the upgrade answers 401 with this reason).
public struct AuthRefusal: Error, Sendable, Equatable {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
}

/// Verifies and mints HS256 tokens with one shared secret. Only HS256 is registered, so
/// `alg: none` and every other algorithm are refused by construction.
public struct TokenVerifier: Sendable {
    private let keys: JWTKeyCollection

    /// HS256 secrets shorter than the hash output are refused (they are guessable).
    public static let minimumSecretBytes = 32

    public struct WeakSecret: Error, CustomStringConvertible {
        public var description: String { "the JWT secret must be at least \(TokenVerifier.minimumSecretBytes) bytes" }
    }

    public init(secret: String) async throws(WeakSecret) {
        guard secret.utf8.count >= Self.minimumSecretBytes else { throw WeakSecret() }
        keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
    }

    public func verify(_ token: String) async -> Result<AuthorizedUser, AuthRefusal> {
        switch Self.headerAlgorithm(of: token) {
        case "HS256": break
        case nil: return .failure(AuthRefusal("invalid token"))
        default: return .failure(AuthRefusal("tokens must be signed with HS256"))
        }
        let claims: ChatClaims
        do {
            claims = try await keys.verify(token, as: ChatClaims.self)
        } catch let error as JWTError where error.errorType == .claimVerificationFailure {
            return .failure(AuthRefusal("token expired"))
        } catch {
            return .failure(AuthRefusal("invalid token"))
        }
        guard Names.isValidUser(claims.sub.value) else {
            return .failure(AuthRefusal("sub must be 1 to 32 characters from [A-Za-z0-9_.-]"))
        }
        return .success(AuthorizedUser(name: claims.sub.value, rooms: claims.rooms.map(RoomPermission.only) ?? .any))
    }

    /// A token for local testing (`chatctl token`).
    public func mint(user: String, lifetime: TimeInterval, rooms: [String]?) async throws -> String {
        try await keys.sign(ChatClaims(sub: user, exp: Date().addingTimeInterval(lifetime), rooms: rooms))
    }

    /// The header's `alg`, read before any verification so that a token claiming another
    /// algorithm is refused for that reason and never reaches a verifier.
    private static func headerAlgorithm(of token: String) -> String? {
        guard let header = token.split(separator: ".", omittingEmptySubsequences: false).first,
              let data = Data(base64URLEncoded: String(header)),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        return object["alg"] as? String
    }
}

extension Data {
    init?(base64URLEncoded text: String) {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        self.init(base64Encoded: base64)
    }
}

/// Compares a presented API key with the configured one in time that does not depend on
/// where they first differ.
public enum APIKey {
    public static func matches(_ presented: String, expected: String) -> Bool {
        let a = Array(presented.utf8)
        let b = Array(expected.utf8)
        var difference = UInt8(a.count == b.count ? 0 : 1)
        for index in 0..<max(a.count, b.count) {
            difference |= (index < a.count ? a[index] : 0) ^ (index < b.count ? b[index] : 0)
        }
        return difference == 0 && !b.isEmpty
    }
}
