import Testing
@testable import ChatArchive

@Suite struct PostgresArchiveTests {
    @Test func nulIsStoredAsTheReplacementCharacterAndNothingElseChanges() {
        #expect(PostgresArchive.storable("plain text, é 😀") == "plain text, é 😀")
        #expect(PostgresArchive.storable("\u{0}a\u{0}\u{0}b\u{0}") == "\u{FFFD}a\u{FFFD}\u{FFFD}b\u{FFFD}")
        #expect(PostgresArchive.storable("e\u{301}\u{0}😀") == "e\u{301}\u{FFFD}😀")
    }
}
