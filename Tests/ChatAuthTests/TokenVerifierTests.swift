import ChatAuth
import Foundation
import Testing

private let secret = "0123456789abcdef0123456789abcdef"

@Suite struct TokenVerifierTests {
    @Test func mintedTokenVerifies() async throws {
        let verifier = try await TokenVerifier(secret: secret)
        let token = try await verifier.mint(user: "alice", lifetime: 60, rooms: ["live:*", "lobby"])
        let user = try await verifier.verify(token).get()
        #expect(user.name == "alice")
        #expect(user.rooms.allows("live:42"))
        #expect(user.rooms.allows("lobby"))
        #expect(!user.rooms.allows("lobby2"))
        #expect(!user.rooms.allows("other"))
    }

    @Test func absentRoomsClaimAllowsAnyRoom() async throws {
        let verifier = try await TokenVerifier(secret: secret)
        let token = try await verifier.mint(user: "bob", lifetime: 60, rooms: nil)
        #expect(try await verifier.verify(token).get().rooms == .any)
    }

    @Test func expiredTokenIsRefused() async throws {
        let verifier = try await TokenVerifier(secret: secret)
        let token = try await verifier.mint(user: "alice", lifetime: -10, rooms: nil)
        #expect(await verifier.verify(token) == .failure(AuthRefusal("token expired")))
    }

    @Test func otherSecretIsRefused() async throws {
        let minter = try await TokenVerifier(secret: String(repeating: "o", count: 32))
        let verifier = try await TokenVerifier(secret: secret)
        let token = try await minter.mint(user: "alice", lifetime: 60, rooms: nil)
        #expect(await verifier.verify(token) == .failure(AuthRefusal("invalid token")))
    }

    @Test(arguments: [
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (no signature)
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.",
        // {"alg":"HS512","typ":"JWT"} with the same payload and a junk signature
        "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmF0dXJl",
    ])
    func otherAlgorithmsAreRefused(token: String) async throws {
        let verifier = try await TokenVerifier(secret: secret)
        #expect(await verifier.verify(token) == .failure(AuthRefusal("tokens must be signed with HS256")))
    }

    @Test(arguments: ["", "garbage", "a.b.c", "....", String(repeating: "x", count: 10_000)])
    func garbageIsRefused(token: String) async throws {
        let verifier = try await TokenVerifier(secret: secret)
        #expect(await verifier.verify(token) == .failure(AuthRefusal("invalid token")))
    }

    @Test func shortSecretsAreRefused() async {
        await #expect(throws: TokenVerifier.WeakSecret.self) { try await TokenVerifier(secret: "s3cret") }
    }

    @Test func badUserNameInSubIsRefused() async throws {
        let verifier = try await TokenVerifier(secret: secret)
        let token = try await verifier.mint(user: "not a name", lifetime: 60, rooms: nil)
        #expect(await verifier.verify(token) == .failure(AuthRefusal("sub must be 1 to 32 characters from [A-Za-z0-9_.-]")))
    }

    @Test func apiKeyComparison() {
        #expect(APIKey.matches("k3y", expected: "k3y"))
        #expect(!APIKey.matches("k3z", expected: "k3y"))
        #expect(!APIKey.matches("k3", expected: "k3y"))
        #expect(!APIKey.matches("k3yy", expected: "k3y"))
        #expect(!APIKey.matches("", expected: ""))
    }
}
