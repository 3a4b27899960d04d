// swift-tools-version: 6.2
import PackageDescription

let nio: [Target.Dependency] = [
    .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
]

// The modules on the data path (frames, bus, relay, worker, engine, load generator) leave
// Swift's run-time exclusivity checks out of release builds. Each check on a class's stored
// property or a global is a call that looks the access up in a thread-local set: about
// 1.6 µs of the workers' 47 µs of samples per URL join in perf (BENCHMARKS.md, optimisation
// log). Debug builds, which every test runs, keep the checks, so an overlapping access still
// traps there.
let dataPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "chatgw",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "chatgw", targets: ["chatgw"]),
        .executable(name: "chatctl", targets: ["chatctl"]),
        .executable(name: "chatbench", targets: ["chatbench"]),
        .executable(name: "chatengine-probe", targets: ["chatengine-probe"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-configuration.git", from: "1.4.0", traits: ["JSON", "YAML"]),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        // docs/PROTOCOL.md as types and codecs; no I/O.
        .target(name: "ChatProtocol", dependencies: [.product(name: "NIOCore", package: "swift-nio")], swiftSettings: dataPath),
        // The config model, its loading (file, environment, flags) and validation.
        .target(name: "ChatConfig", dependencies: [.product(name: "Configuration", package: "swift-configuration")]),
        // Thin POSIX layer: file descriptors, sockets, signals, process spawning, logging.
        .target(name: "ChatSystem", dependencies: ["CSystemShims", .product(name: "Logging", package: "swift-log")]),
        .target(name: "CSystemShims"),
        // Messages on the master <-> child control link (newline-delimited JSON).
        .target(name: "ChatLink", dependencies: ["ChatSystem", "ChatControl", .product(name: "NIOExtras", package: "swift-nio-extras")] + nio),
        // The durable archive: SQLite (GRDB) or PostgreSQL (postgres-nio) behind one interface.
        .target(name: "ChatArchive", dependencies: ["ChatProtocol", "ChatConfig",
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "PostgresNIO", package: "postgres-nio"),
            .product(name: "Logging", package: "swift-log")]),
        // The archiver process: every sequenced message from the bus into the archive.
        .target(name: "ChatArchiver", dependencies: ["ChatArchive", "ChatBus", "ChatLink", "ChatConfig", "ChatSystem", "ChatControl"] + nio),
        // Who a client is: JWT verification and minting, API key comparison.
        .target(name: "ChatAuth", dependencies: ["ChatProtocol", .product(name: "JWTKit", package: "jwt-kit")]),
        // The control socket's request/response types, shared by the master and chatctl.
        .target(name: "ChatControl"),
        // hiredis (Debian's libhiredis-dev): its RESP reader and command formatter.
        .systemLibrary(name: "CHiredis", providers: [.apt(["libhiredis-dev"])]),
        // The bus interface, the relay wire format and client, and the Redis client.
        .target(name: "ChatBus", dependencies: ["ChatProtocol", "ChatConfig", "ChatSystem", "CHiredis"] + nio, swiftSettings: dataPath),
        // The embedded bus: a Unix socket server giving rooms their seq, epoch and history.
        .target(name: "ChatRelay", dependencies: ["ChatBus", "ChatLink", "ChatControl", "ChatConfig", "ChatSystem"] + nio, swiftSettings: dataPath),
        // One worker process: HTTP -> WebSocket -> protocol -> sessions -> local rooms.
        .target(name: "ChatWorker", dependencies: ["ChatProtocol", "ChatEngine", "CChatEngine", "ChatAuth", "ChatArchive", "ChatBus", "ChatLink", "ChatControl", "ChatConfig", "ChatSystem",
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOWebSocket", package: "swift-nio")] + nio, swiftSettings: dataPath),
        // The supervisor: binds, spawns, reaps, restarts, handles signals.
        .target(name: "ChatMaster", dependencies: ["ChatLink", "ChatControl", "ChatConfig", "ChatSystem", "ChatAuth",
            .product(name: "Prometheus", package: "swift-prometheus")]),
        .executableTarget(name: "chatgw", dependencies: ["ChatMaster", "ChatWorker", "ChatRelay", "ChatArchiver", "ChatArchive", "ChatConfig", "ChatSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        .executableTarget(name: "chatctl", dependencies: ["ChatControl", "ChatConfig", "ChatAuth",
            .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        // The load generator behind scripts/bench: connect, idle, fanout and churn scenarios.
        .executableTarget(name: "chatbench", dependencies: [
            "CChatEngine",
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Histogram", package: "hdrhistogram-swift")], swiftSettings: dataPath),
        // A prototype engine for client sockets: one epoll loop over raw descriptors,
        // connections as value records in a slab, upgrade and frames parsed in place.
        .target(name: "ChatEngine", dependencies: ["CChatEngine"], swiftSettings: dataPath),
        .target(name: "CChatEngine"),
        // ChatEngine speaking nchan's WebSocket endpoints, to measure it against nginx+nchan.
        .executableTarget(name: "chatengine-probe", dependencies: ["ChatEngine", "CSystemShims"]),
        .testTarget(name: "ChatConfigTests", dependencies: ["ChatConfig"]),
        .testTarget(name: "ChatProtocolTests", dependencies: ["ChatProtocol"]),
        .testTarget(name: "ChatMasterTests", dependencies: ["ChatMaster"]),
        .testTarget(name: "ChatLinkTests", dependencies: ["ChatLink", "ChatControl"]),
        .testTarget(name: "ChatBusTests", dependencies: ["ChatBus", .product(name: "NIOEmbedded", package: "swift-nio")]),
        .testTarget(name: "ChatRelayTests", dependencies: ["ChatRelay", "ChatBus"]),
        .testTarget(name: "ChatAuthTests", dependencies: ["ChatAuth"]),
        .testTarget(name: "ChatArchiveTests", dependencies: ["ChatArchive", .product(name: "GRDB", package: "GRDB.swift")]),
        .target(name: "LoopbackSockets", path: "Tests/LoopbackSockets"),
        .testTarget(name: "ChatEngineTests", dependencies: ["ChatEngine", "LoopbackSockets"]),
        .testTarget(name: "ChatWorkerTests", dependencies: ["ChatWorker", "LoopbackSockets"] + nio),
    ],
    swiftLanguageModes: [.v6]
)
