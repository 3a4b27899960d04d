#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOConcurrencyHelpers

/// Runs the phases of a scenario: in this process (`LocalDriver`) or split over child
/// processes when one process's open files are not enough (`ShardedDriver`). Both give
/// back one merged report per phase.
protocol Driver: AnyObject {
    var onProgress: ((Progress) -> Void)? { get set }
    func setup(total: Int, mode: Mode, timeout: Double) -> PhaseReport
    /// `abortP99Ms` > 0: cut the step short once its p99 passes that (see `Engine.step`).
    func step(rate: Double, seconds: Double, drainMax: Double, abortP99Ms: Double) -> PhaseReport
    func churn(rate: Double, seconds: Double) -> PhaseReport
    /// `--stalled`: the stalled members read again for up to `seconds`; reports how many found their connection ended.
    func probeStalled(seconds: Double) -> PhaseReport
    /// Keeps every connection open for `seconds`; reports what the server closed meanwhile.
    func hold(seconds: Double) -> PhaseReport
    /// Closes every connection; returns how many did not close in time.
    func closeAll() -> Int
    func shutdown()
}

final class LocalDriver: Driver {
    let engine: Engine
    var onProgress: ((Progress) -> Void)? {
        get { engine.onProgress }
        set { engine.onProgress = newValue }
    }

    init(spec: Spec) throws {
        engine = try Engine(spec: spec)
    }

    func setup(total: Int, mode: Mode, timeout: Double) -> PhaseReport { engine.setup(total: total, mode: mode, timeout: timeout) }
    func step(rate: Double, seconds: Double, drainMax: Double, abortP99Ms: Double) -> PhaseReport {
        engine.step(rate: rate, seconds: seconds, drainMax: drainMax, abortP99Ms: abortP99Ms)
    }
    func churn(rate: Double, seconds: Double) -> PhaseReport { engine.churn(rate: rate, seconds: seconds) }
    func probeStalled(seconds: Double) -> PhaseReport { engine.probeStalled(seconds: seconds) }
    func hold(seconds: Double) -> PhaseReport { engine.hold(seconds: seconds) }
    func closeAll() -> Int { engine.closeAll() }
    func shutdown() { engine.shutdown() }
}

/// A command to a child process, one JSON line on its stdin.
struct ChildCommand: Codable {
    var op: String
    var total = 0
    var mode = Mode.member
    var timeout = 0.0
    var rate = 0.0
    var seconds = 0.0
    var drainMax = 0.0
    var abortP99Ms = 0.0
}

/// The parent's side: K children (`chatbench child --spec JSON`), each playing the
/// share `processIndex` of `processCount`. Commands go to all children at once; their
/// progress lines (`P {json}`) feed the live line, their reports (`R {json}`) are merged.
final class ShardedDriver: Driver {
    /// Shared by the calling thread and the child's reader thread: what the reader
    /// produces is behind a lock (a few lines a second, not per message).
    private final class Child: Sendable {
        struct Received {
            var reports: [PhaseReport] = []
            var progress = Progress()
            var exited = false
        }
        let process = Process()
        let input = Pipe()
        let output = Pipe()
        let received = NIOLockedValueBox(Received())
    }

    private var children: [Child] = []
    var onProgress: ((Progress) -> Void)?

    init(spec: Spec) throws {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        for i in 0..<spec.processCount {
            var mine = spec
            mine.processIndex = i
            let child = Child()
            let json = String(decoding: try JSONEncoder().encode(mine), as: UTF8.self)
            child.process.executableURL = URL(fileURLWithPath: exe)
            child.process.arguments = ["child", "--spec", json]
            child.process.standardInput = child.input
            child.process.standardOutput = child.output
            child.process.standardError = FileHandle.standardError
            try child.process.run()
            let thread = Thread { Self.readLines(of: child) }
            thread.start()
            children.append(child)
        }
    }

    private static func readLines(of child: Child) {
        let fd = child.output.fileHandleForReading.fileDescriptor
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        let decoder = JSONDecoder()
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            pending.append(contentsOf: chunk[0..<n])
            while let nl = pending.firstIndex(of: 0x0A) {
                let line = Array(pending[0..<nl])
                pending.removeSubrange(0...nl)
                guard line.count > 2 else { continue }
                let body = Data(line[2...])
                if line[0] == UInt8(ascii: "P"), let p = try? decoder.decode(Progress.self, from: body) {
                    child.received.withLockedValue { $0.progress = p }
                } else if line[0] == UInt8(ascii: "R") {
                    let report = (try? decoder.decode(PhaseReport.self, from: body)) ?? PhaseReport()
                    child.received.withLockedValue { $0.reports.append(report) }
                }
            }
        }
        child.received.withLockedValue { $0.exited = true }
    }

    private func run(_ command: ChildCommand) -> PhaseReport {
        let line = String(decoding: try! JSONEncoder().encode(command), as: UTF8.self) + "\n"
        for child in children {
            child.received.withLockedValue { $0.progress = Progress() }
            child.input.fileHandleForWriting.write(line.data(using: .utf8)!)
        }
        var results: [PhaseReport] = []
        var lastProgress = monotonicNanos()
        for child in children {
            // Until its report arrives, or it exits without one.
            while true {
                let (report, exited) = child.received.withLockedValue { r -> (PhaseReport?, Bool) in
                    (r.reports.isEmpty ? nil : r.reports.removeFirst(), r.exited)
                }
                if let report { results.append(report); break }
                if exited { break }
                sleepMillis(50)
                if monotonicNanos() - lastProgress >= 1_000_000_000 {
                    lastProgress = monotonicNanos()
                    onProgress?(mergedProgress())
                }
            }
        }
        if results.count < children.count {
            FileHandle.standardError.write("chatbench: \(children.count - results.count) load process(es) died; their share is missing from the results\n".data(using: .utf8)!)
        }
        var merged = PhaseReport.merged(results)
        merged.processes = results.count
        return merged
    }

    private func mergedProgress() -> Progress {
        var merged = Progress()
        for child in children {
            let progress = child.received.withLockedValue { $0.progress }
            merged.counters = merged.counters + progress.counters
            merged.p99us = max(merged.p99us, progress.p99us)
        }
        return merged
    }

    func setup(total: Int, mode: Mode, timeout: Double) -> PhaseReport {
        run(ChildCommand(op: "setup", total: total, mode: mode, timeout: timeout))
    }

    func step(rate: Double, seconds: Double, drainMax: Double, abortP99Ms: Double) -> PhaseReport {
        // Each process judges the p99 of its own members: they are a sample of every room.
        run(ChildCommand(op: "step", rate: rate, seconds: seconds, drainMax: drainMax, abortP99Ms: abortP99Ms))
    }

    func churn(rate: Double, seconds: Double) -> PhaseReport {
        run(ChildCommand(op: "churn", rate: rate, seconds: seconds))
    }

    func hold(seconds: Double) -> PhaseReport {
        run(ChildCommand(op: "hold", seconds: seconds))
    }

    func probeStalled(seconds: Double) -> PhaseReport {
        run(ChildCommand(op: "probe", seconds: seconds))
    }

    func closeAll() -> Int {
        run(ChildCommand(op: "close")).counters.open
    }

    func shutdown() {
        for child in children {
            try? child.input.fileHandleForWriting.close()
        }
        for child in children { child.process.waitUntilExit() }
    }
}

/// The child's side: commands from stdin, progress and reports to stdout.
enum ChildMain {
    static func run(specJSON: String) throws {
        let spec = try JSONDecoder().decode(Spec.self, from: Data(specJSON.utf8))
        let engine = try Engine(spec: spec)
        let encoder = JSONEncoder()
        let emit: (Character, Data) -> Void = { tag, body in
            var line = Data("\(tag) ".utf8)
            line.append(body)
            line.append(0x0A)
            FileHandle.standardOutput.write(line)
        }
        engine.onProgress = { p in emit("P", (try? encoder.encode(p)) ?? Data()) }
        while let line = readLine() {
            guard let command = try? JSONDecoder().decode(ChildCommand.self, from: Data(line.utf8)) else { continue }
            var report: PhaseReport
            switch command.op {
            case "setup": report = engine.setup(total: command.total, mode: command.mode, timeout: command.timeout)
            case "step":
                report = engine.step(rate: command.rate, seconds: command.seconds, drainMax: command.drainMax, abortP99Ms: command.abortP99Ms)
            case "churn": report = engine.churn(rate: command.rate, seconds: command.seconds)
            case "probe": report = engine.probeStalled(seconds: command.seconds)
            case "hold": report = engine.hold(seconds: command.seconds)
            case "close":
                report = PhaseReport()
                report.counters.open = engine.closeAll()
            default: continue
            }
            emit("R", (try? encoder.encode(report)) ?? Data())
        }
        _ = engine.closeAll(timeout: 5)
        engine.shutdown()
    }
}
