#if canImport(Glibc)
import Glibc
#endif

/// Starts child processes with posix_spawn (fork+exec in one step: a bare fork of a
/// process that has started threads is unsafe), placing chosen descriptors at fixed numbers.
public enum Spawner {
    public struct Inherit: Sendable {
        public var source: Int32
        public var target: Int32
        public init(_ source: Int32, as target: Int32) {
            self.source = source
            self.target = target
        }
    }

    /// Spawns `executable` with `arguments` (argv[0] included) and `environment`.
    /// Only the descriptors in `inherit` (and 0, 1, 2) are open in the child.
    public static func spawn(
        executable: String,
        arguments: [String],
        environment: [String: String],
        inherit: [Inherit]
    ) throws(SystemError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for item in inherit {
            posix_spawn_file_actions_adddup2(&actions, item.source, item.target)
        }
        let highest = inherit.map(\.target).max() ?? 2
        if let closeFrom = addCloseFrom {
            _ = closeFrom(&actions, highest + 1)
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        var defaults = sigset_t()
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        guard status == 0 else { throw SystemError("posix_spawn \(executable)", errno: status) }
        return pid
    }

    /// Not declared by Glibc's module map, but exported by glibc >= 2.34.
    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    private static let addCloseFrom: AddCloseFrom? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
            return nil
        }
        return unsafeBitCast(symbol, to: AddCloseFrom.self)
    }()

    /// This executable's path, for re-exec'ing ourselves as a child.
    public static func currentExecutable() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { return CommandLine.arguments[0] }
        return String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
