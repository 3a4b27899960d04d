import Foundation
import Testing
@testable import ChatConfig

/// The repository's etc/chatgw.yaml, found from this file's location.
let shippedConfigPath = URL(filePath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appending(path: "etc/chatgw.yaml").path

/// Writes `yaml` to a fresh temporary file and returns its path.
func temporaryConfig(_ yaml: String) throws -> String {
    let url = FileManager.default.temporaryDirectory.appending(path: "chatgw-test-\(UUID().uuidString).yaml")
    try yaml.write(to: url, atomically: true, encoding: .utf8)
    return url.path
}

func load(file: String? = nil, env: [String: String] = [:], flags: [String: String] = [:]) async throws(ConfigError) -> GatewayConfig {
    try await ConfigLoader.load(file: file, environment: env, overrides: flags)
}

/// The ConfigError loading throws; records a failure and returns nil when loading succeeds.
func loadError(file: String? = nil, env: [String: String] = [:], flags: [String: String] = [:],
               sourceLocation: SourceLocation = #_sourceLocation) async -> ConfigError? {
    do {
        _ = try await ConfigLoader.load(file: file, environment: env, overrides: flags)
    } catch {
        return error
    }
    Issue.record("expected a ConfigError", sourceLocation: sourceLocation)
    return nil
}
