import Foundation
import Testing
@testable import ChatConfig

@Suite struct ErrorTests {
    @Test func typeErrorMessageHasTheExactForm() async {
        let error = await loadError(env: ["CHATGW_SERVER_WORKERS": "abc"])
        #expect(error?.key == "server.workers")
        #expect(error?.description == #"invalid config: server.workers: must be "auto" or an integer from 1 to 256 (got "abc")"#)
    }

    @Test(arguments: [
        ("CHATGW_LIMITS_RATE_PER_S", "fast", "limits.rate_per_s"),
        ("CHATGW_LIMITS_RATE_PER_S", "inf", "limits.rate_per_s"),
        ("CHATGW_SERVER_BACKLOG", "1.5", "server.backlog"),
        ("CHATGW_HISTORY_PERSIST", "maybe", "history.persist"),
        ("CHATGW_BUS_KIND", "kafka", "bus.kind"),
        ("CHATGW_SERVER_ENGINE", "io_uring", "server.engine"),
        ("CHATGW_AUTH_MODE", "basic", "auth.mode"),
        ("CHATGW_LOG_LEVEL", "loud", "log.level"),
        ("CHATGW_SERVER_LISTEN", "8080", "server.listen"),
        ("CHATGW_METRICS_LISTEN", "example.com:80", "metrics.listen"),
    ])
    func environmentTypeErrorNamesTheKey(variable: String, value: String, key: String) async {
        let error = await loadError(env: [variable: value])
        #expect(error?.key == key)
        #expect(error?.description.hasPrefix("invalid config: \(key): must be ") == true)
        #expect(error?.description.hasSuffix("(got \"\(value)\")") == true)
    }

    @Test func fileTypeErrorNamesTheKey() async throws {
        let scalar = try temporaryConfig("limits:\n  burst: lots\n")
        let error = await loadError(file: scalar)
        #expect(error?.description == #"invalid config: limits.burst: must be an integer of at least 1 (got "lots")"#)

        let sequence = try temporaryConfig("server:\n  workers: [1, 2]\n")
        let sequenceError = await loadError(file: sequence)
        #expect(sequenceError?.key == "server.workers")
        #expect(sequenceError?.description.hasSuffix("(got a sequence)") == true)
    }

    @Test func unknownFileKeysAreRejected() async throws {
        let typo = try temporaryConfig("server:\n  wrokers: 2\n")
        let error = await loadError(file: typo)
        #expect(error?.key == "server.wrokers")
        #expect(error?.description == "invalid config: server.wrokers: unknown key")

        let section = try temporaryConfig("sever:\n  workers: 2\n")
        let sectionError = await loadError(file: section)
        #expect(sectionError?.description == "invalid config: sever: unknown section")
    }

    @Test func unknownFlagKeyIsRejected() async {
        let error = await loadError(flags: ["server.wrokers": "2"])
        #expect(error?.key == "server.wrokers")
    }

    @Test func missingFile() async {
        let error = await loadError(file: "/nonexistent/x.yaml")
        #expect(error?.key == nil)
        #expect(error?.description == "cannot read config file /nonexistent/x.yaml: No such file or directory")
    }

    @Test func yamlSyntaxErrorIsOneLine() async throws {
        let file = try temporaryConfig("server:\n  workers: 2\n listen: [oops\n")
        let error = await loadError(file: file)
        let description = error?.description ?? ""
        #expect(description.hasPrefix("invalid config file \(file): line "))
        #expect(!description.contains("\n"))
    }

    @Test func topLevelMustBeAMapping() async throws {
        let file = try temporaryConfig("- server\n")
        let error = await loadError(file: file)
        #expect(error?.description == "invalid config file \(file): the top level must be a mapping of sections")
    }

    @Test func secretsAreNotEchoed() async throws {
        // Secrets are plain strings and cannot fail to parse; check the redaction path directly.
        let field = try #require(ConfigField.byKey["auth.jwt_secret"])
        #expect(!field.invalid(got: "hunter2").description.contains("hunter2"))
    }
}
