/// Why a configuration could not be loaded or is not valid.
///
/// `description` is always one line, so it can go straight into a log line or to stderr:
/// `invalid config: server.workers: must be "auto" or an integer from 1 to 256 (got "abc")`,
/// or, for problems with the file as a whole, `cannot read config file etc/x.yaml: No such
/// file or directory` and `invalid config file etc/x.yaml: <parser's reason>`.
public struct ConfigError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The dotted key at fault ("server.workers"), or nil when the problem is the file itself.
    public var key: String?
    /// What is wrong: for a key, what is allowed and then what was given.
    public var message: String

    public init(key: String?, message: String) {
        self.key = key
        self.message = message
    }

    public var description: String {
        guard let key else { return message }
        return "invalid config: \(key): \(message)"
    }

    /// A key whose value is not allowed. `got` is the value as the user wrote it.
    static func invalid(_ key: String, mustBe allowed: String, got: String) -> ConfigError {
        ConfigError(key: key, message: "must be \(allowed) (got \(quoted(got)))")
    }

    /// Quotes and escapes a user-supplied value so that the description stays on one line.
    static func quoted(_ value: String) -> String {
        value.debugDescription
    }
}
