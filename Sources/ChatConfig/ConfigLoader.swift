import Configuration
import Foundation
// Yams is not a declared dependency of ChatConfig; it is importable because swift-configuration's
// YAML trait builds it. It is used only to list the file's keys, which swift-configuration
// cannot do, and to word YAML syntax errors.
internal import Yams

/// Builds a `GatewayConfig` from flags, environment, file and built-in defaults, in that
/// order of precedence, using swift-configuration.
///
/// Environment variables are `CHATGW_` + the dotted key upper-cased with "." replaced by
/// "_": `limits.rate_per_s` is `CHATGW_LIMITS_RATE_PER_S`. Other `CHATGW_*` variables are
/// ignored. Values in any source are text ("4", "auto", "true", "0.5"), so a file may quote
/// them or not.
public enum ConfigLoader {
    /// Every config key, dotted as in the file ("server.workers"), in file order.
    public static var keys: [String] { ConfigField.all.map(\.key) }

    /// The environment variable that overrides `key`: "server.workers" -> "CHATGW_SERVER_WORKERS".
    public static func environmentName(for key: String) -> String {
        "CHATGW_" + key.uppercased().replacingOccurrences(of: ".", with: "_")
    }

    /// Loads and validates the configuration. Throws `ConfigError` only.
    ///
    /// - Parameters:
    ///   - file: YAML config file; nil for none (built-in defaults). Relative to the current directory.
    ///   - environment: usually `ProcessInfo.processInfo.environment`.
    ///   - overrides: command-line flag values by dotted key, e.g. ["server.workers": "4"].
    public static func load(
        file: String?,
        environment: [String: String],
        overrides: [String: String]
    ) async throws(ConfigError) -> GatewayConfig {
        var providers: [any ConfigProvider] = [try flagProvider(overrides), environmentProvider(environment)]
        if let file, let fileProvider = try await fileProvider(path: file) {
            providers.append(fileProvider)
        }
        let reader = ConfigReader(providers: providers)

        var config = GatewayConfig()
        // Every key is read as text and parsed here because the reader's typed getters
        // return nil for a value of the wrong type, which would hide the user's mistake.
        // string(forKey:) has that problem only for non-scalar file values: checkKeys rejects them.
        for field in ConfigField.all {
            guard let text = reader.string(forKey: ConfigKey(field.key), isSecret: field.isSecret) else { continue }
            guard field.assign(&config, text) else { throw field.invalid(got: text) }
        }
        try config.validate()
        return config
    }

    private static let secretKeys: Set<String> = Set(ConfigField.all.filter(\.isSecret).map(\.key))

    private static func flagProvider(_ overrides: [String: String]) throws(ConfigError) -> InMemoryProvider {
        var values: [AbsoluteConfigKey: ConfigValue] = [:]
        for (key, text) in overrides {
            guard let field = ConfigField.byKey[key] else { throw ConfigError(key: key, message: "unknown key") }
            values[AbsoluteConfigKey(ConfigKey(key))] = ConfigValue(.string(text), isSecret: field.isSecret)
        }
        return InMemoryProvider(name: "flags", values: values)
    }

    private static func environmentProvider(_ environment: [String: String]) -> some ConfigProvider {
        // The provider names "limits.rate_per_s" LIMITS_RATE_PER_S (components upper-cased,
        // joined with "_"); the "chatgw" key prefix turns that into CHATGW_LIMITS_RATE_PER_S.
        EnvironmentVariablesProvider(
            environmentVariables: environment,
            secretsSpecifier: .specific(Set(secretKeys.map(environmentName(for:))))
        ).prefixKeys(with: ConfigKey(["chatgw"]))
    }

    /// nil for a file with no YAML document (empty or only comments), which
    /// swift-configuration's YAML snapshot would reject.
    private static func fileProvider(path: String) async throws(ConfigError) -> (any ConfigProvider)? {
        let text = try readFile(path)
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw ConfigError(key: nil, message: "invalid config file \(path): \(describe(error))")
        }
        guard let root else { return nil }
        try checkKeys(root, path: path)
        do {
            // FileProvider's FilePath initializer would need SystemPackage, which ChatConfig
            // does not declare; this one takes the path from a ConfigReader instead.
            let location = ConfigReader(provider: InMemoryProvider(values: ["filePath": ConfigValue(.string(path), isSecret: false)]))
            return try await FileProvider<YAMLSnapshot>(
                parsingOptions: .init(secretsSpecifier: .specific(secretKeys)),
                config: location)
        } catch {
            throw ConfigError(key: nil, message: "invalid config file \(path): \(oneLine(error))")
        }
    }

    private static func readFile(_ path: String) throws(ConfigError) -> String {
        // Read with POSIX calls rather than Foundation to report errno's own wording.
        func failure() -> ConfigError {
            ConfigError(key: nil, message: "cannot read config file \(path): \(String(cString: strerror(errno)))")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure() }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count == 0 { break }
            if count < 0 {
                if errno == EINTR { continue }
                throw failure()
            }
            bytes += chunk[..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Rejects unknown sections and keys (a typo would otherwise be silently ignored) and
    /// values that are not scalars (swift-configuration would silently ignore those too).
    private static func checkKeys(_ root: Node, path: String) throws(ConfigError) {
        guard let sections = root.mapping else {
            throw ConfigError(key: nil, message: "invalid config file \(path): the top level must be a mapping of sections")
        }
        let sectionNames = Set(ConfigField.all.map { $0.key.prefix { $0 != "." } })
        for (sectionNode, body) in sections {
            let section = sectionNode.string ?? "\(sectionNode)"
            guard sectionNames.contains(Substring(section)) else {
                throw ConfigError(key: section, message: "unknown section")
            }
            if body.null != nil { continue }  // "server:" with every key commented out
            guard let entries = body.mapping else {
                throw ConfigError(key: section, message: "must be a mapping of keys (got \(kind(of: body)))")
            }
            for (keyNode, value) in entries {
                let key = section + "." + (keyNode.string ?? "\(keyNode)")
                guard let field = ConfigField.byKey[key] else { throw ConfigError(key: key, message: "unknown key") }
                guard value.scalar != nil else {
                    throw ConfigError(key: key, message: "must be \(field.allowed) (got \(kind(of: value)))")
                }
            }
        }
    }

    private static func kind(of node: Node) -> String {
        switch node {
        case .mapping: "a mapping"
        case .sequence: "a sequence"
        case .scalar(let scalar): ConfigError.quoted(scalar.string)
        case .alias: "an alias"
        }
    }

    /// libyaml's problem and position on one line.
    private static func describe(_ error: any Error) -> String {
        guard let error = error as? YamlError else { return oneLine(error) }
        switch error {
        case .scanner(let context, let problem, let mark, _),
             .parser(let context, let problem, let mark, _),
             .composer(let context, let problem, let mark, _):
            let during = context.map { " (\($0.text) at line \($0.mark.line), column \($0.mark.column))" } ?? ""
            return "line \(mark.line), column \(mark.column): \(problem)\(during)"
        case .duplicatedKeysInMapping(let duplicates, let context):
            return "line \(context.mark.line), column \(context.mark.column): duplicate key \(duplicates.sorted().joined(separator: ", "))"
        default:
            return oneLine(error)
        }
    }
}
