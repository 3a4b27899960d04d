import ArgumentParser
import Foundation

@main
struct ChatBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatbench",
        abstract: "Load generator for chatgw: handshakes, idle memory, fan-out throughput and latency, churn.",
        discussion: """
            Start chatgw with benchmark limits first, e.g.
              CHATGW_LIMITS_RATE_PER_S=1000000 CHATGW_LIMITS_BURST=1000000 CHATGW_ARCHIVE_KIND=none chatgw --state-dir /tmp/bench
            then point chatbench at it; --state-dir (or --server-pid) lets it measure the server's CPU and memory.
            A progress line goes to stderr once a second; --json prints the results as JSON on stdout.
            """,
        subcommands: [Connect.self, Idle.self, Fanout.self, Hotroom.self, Churn.self, Child.self])
}

struct CommonOptions: ParsableArguments {
    @Option(help: "The gateway's WebSocket endpoint.")
    var url = "ws://127.0.0.1:8080/ws"

    @Option(help: "Event loop threads per load process (1 or 2 on a 2-core machine).")
    var threads = 1

    @Option(help: "Load processes (default: enough for --per-process connections each).")
    var processes: Int?

    @Option(help: "Connections per load process when --processes is not given (open files are limited to 20,000 per process).")
    var perProcess = 19_000

    @Option(help: "Bind client sockets to this many source addresses 127.0.0.2, .3, ... (default: one per 8,000 connections, none below that).")
    var sources: Int?

    @Option(help: "Connection setups in flight at once, over all load processes.")
    var concurrency = 256

    @Option(help: "TCP connect timeout, ms.")
    var connectTimeoutMs = 10_000

    @Option(help: "The chatgw master's pid (its workers, relay and archiver are found below it).")
    var serverPid: Int32?

    @Option(help: "chatgw's state dir (its chatgw.pid names the master).")
    var stateDir: String?

    @Flag(help: "Print the results as JSON on stdout (the summary goes to stderr).")
    var json = false

    @Flag(help: "No progress line.")
    var quiet = false

    @Option(help: "A label stored with the results.")
    var label: String?

    @Option(name: .customLong("protocol"), help: "chatgw, or nchan: subscribe by WebSocket to --url?room=R and publish bare text frames on a WebSocket of each publisher's own to --nchan-pub-path?room=R (connect, idle, fanout only).")
    var proto = "chatgw"

    @Option(help: "nchan: the WebSocket publisher location (nchan_publisher websocket).")
    var nchanPubPath = "/pub"

    @Option(help: "chatgw: how members connect: websocket, or sse (GET --sse-path?rooms=R&user=U on --url's host, a text/event-stream); publishers stay WebSocket members either way (connect, idle, fanout, hotroom).")
    var transport = "websocket"

    @Option(help: "--transport sse: the event stream's path.")
    var ssePath = "/sse"

    @Flag(help: "chatgw WebSocket members name their room in the URL (/ws?rooms=R, protocol v1.2) instead of sending a join after hello: connect and join in one round trip, as nchan's members do.")
    var joinInURL = false
}

/// A fan-out's steps, alike in `fanout` and its presets.
struct StepOptions: ParsableArguments {
    @Option(help: "Seconds per step.") var duration = 10.0
    @Option(help: "At most this many seconds to wait for a step's last messages.") var drain = 15.0
    @Option(help: "Bytes of message text (padded after the t=;p=;n= header).") var textBytes = 64
}

/// `--rates 5,10,20`: positive numbers, in the order given.
func parseRates(_ text: String) throws -> [Double] {
    let list = text.split(separator: ",").compactMap { Double($0.trimmingCharacters(in: .whitespaces)) }
    guard !list.isEmpty, list.allSatisfy({ $0 > 0 }) else { throw ValidationError("--rates: positive numbers, comma-separated") }
    return list
}

extension ChatBench {
    struct Connect: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Open N connections as fast as possible (bounded concurrency): handshakes/s and latency.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Connections to open.") var connections = 10_000

        func run() throws {
            let ctx = try Context.make(common, total: connections, rooms: 1, publishers: 0, textBytes: 0)
            Scenarios.connect(ctx, connections: connections)
        }
    }

    struct Idle: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Hold N connections joined to rooms: server memory (RSS and PSS) per connection.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Connections to hold.") var connections = 10_000
        @Option(help: "Rooms they join (round robin).") var rooms = 100
        @Option(help: "Seconds to wait after the last join before measuring.") var settle = 3.0
        @Option(help: "Seconds to keep the connections open after measuring.") var hold = 0.0

        func run() throws {
            let ctx = try Context.make(common, total: connections, rooms: rooms, publishers: 0, textBytes: 0)
            Scenarios.idle(ctx, connections: connections, rooms: rooms, settle: settle, hold: hold)
        }
    }

    struct Fanout: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "N members over R rooms, P of them publishing at a total rate (or a list of rates, stepping up).",
            discussion: "Each message carries its send time (t=<monotonic ns>;p=<publisher>;n=<counter>); every member checks seq order, holes, duplicates and each publisher's order, and measures latency. A step passes when p99 <= --p99-ms, nothing is lost and deliveries keep up with the offered rate.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Members (connections), publishers included.") var members = 2_000
        @Option(help: "Rooms; member i joins room i % rooms.") var rooms = 20
        @Option(help: "Publishers: members 0..<P; publisher p sends to room p % rooms.") var publishers = 20
        @Option(help: "Messages per second over all publishers; a comma-separated list steps through rates.") var rates = "500"
        @OptionGroup var steps: StepOptions
        @Option(name: .customLong("p99-ms"), help: "A step passes only with p99 at or below this.") var p99Ms = 50.0
        @Option(name: .customLong("abort-p99-ms"), help: "Cut a step short once (after 2 s) its p99 so far is above this, and end the ramp after a step that was cut short or lost, duplicated, reordered or was closed: higher rates only do worse. 0: never.") var abortP99Ms = 0.0
        @Flag(help: "Stop stepping at the first failing rate.") var stopOnFail = false
        @Option(help: "Members that stop reading (the last N; never publishers) when the first step starts: they stay connected, are left out of every count and latency, and at the end get 2 s of reading to show whether the server cut them off.") var stalled = 0

        func run() throws {
            try Self.start(common, .init(members: members, rooms: rooms, publishers: publishers, rates: try parseRates(rates),
                                         duration: steps.duration, drainMax: steps.drain, p99LimitMs: p99Ms, abortP99Ms: abortP99Ms,
                                         stopOnFail: stopOnFail, textBytes: steps.textBytes, stalled: stalled))
        }

        /// Validates the parameters and runs the fan-out (`fanout` and its presets).
        static func start(_ common: CommonOptions, _ p: Scenarios.FanoutParams) throws {
            guard p.publishers >= 1, p.publishers <= p.members, p.rooms >= 1 else { throw ValidationError("need 1 <= publishers <= members and rooms >= 1") }
            guard p.stalled >= 0, p.stalled <= p.members - p.publishers else { throw ValidationError("--stalled: 0 up to members - publishers (publishers never stall)") }
            let ctx = try Context.make(common, total: p.members, rooms: p.rooms, publishers: p.publishers, textBytes: p.textBytes, stalled: p.stalled)
            Scenarios.fanout(ctx, p)
        }
    }

    /// The hot room of a live show (issue 19): a preset of `fanout`, not a scenario of its own.
    struct Hotroom: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "A live show's chat: N members in ONE room, one publisher, rising rates (fanout --rooms 1 --publishers 1 with a p99 limit of 500 ms).",
            discussion: "The best rate that passes (p99 <= --p99-ms, nothing lost) is the result. A step whose p99 so far passes --abort-p99-ms after 2 s is cut short, and a step cut short or with losses ends the ramp: a hopeless rate takes seconds, not minutes.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Members of the room, the publisher included.") var members = 18_000
        @Option(help: "Messages per second into the room, comma-separated, stepping up.") var rates = "5,10,20,50,100"
        @OptionGroup var steps: StepOptions
        @Option(name: .customLong("p99-ms"), help: "A step passes only with p99 at or below this (a live stream's video runs seconds behind).") var p99Ms = 500.0
        @Option(name: .customLong("abort-p99-ms"), help: "Cut a step short above this p99 (default: 4 x --p99-ms; 0: never).") var abortP99Ms: Double?

        func run() throws {
            try Fanout.start(common, .init(scenario: "hotroom", members: members, rooms: 1, publishers: 1, rates: try parseRates(rates),
                                           duration: steps.duration, drainMax: steps.drain, p99LimitMs: p99Ms, abortP99Ms: abortP99Ms ?? 4 * p99Ms,
                                           stopOnFail: false, textBytes: steps.textBytes))
        }
    }

    struct Churn: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Connect, join, leave and close, at a rate: cycles/s and their latency.")
        @OptionGroup var common: CommonOptions
        @Option(help: "Cycles started per second.") var rate = 500.0
        @Option(help: "Seconds to keep starting cycles.") var duration = 10.0
        @Option(help: "Rooms the cycles join (round robin).") var rooms = 10

        func run() throws {
            guard common.proto == "chatgw" else { throw ValidationError("churn: only --protocol chatgw") }
            guard common.transport == "websocket" else { throw ValidationError("churn: only --transport websocket (a stream cannot leave a room)") }
            guard rate > 0, duration > 0, rooms > 0 else { throw ValidationError("churn: --rate, --duration and --rooms must be positive") }
            let ctx = try Context.make(common, total: min(Int(rate * duration), common.concurrency), rooms: rooms, publishers: 0, textBytes: 0)
            Scenarios.churn(ctx, rate: rate, duration: duration, rooms: rooms)
        }
    }

    /// One load process of several (started by chatbench itself).
    struct Child: ParsableCommand {
        static let configuration = CommandConfiguration(shouldDisplay: false)
        @Option var spec: String

        func run() throws {
            try ChildMain.run(specJSON: spec)
        }
    }
}
