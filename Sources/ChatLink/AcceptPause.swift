#if canImport(Glibc)
import Glibc
#endif
import ChatSystem
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// What a child's listening channel does when accept() fails for want of resources (above
/// all EMFILE: a process here may hold at most 20,000 files). The waiting connection keeps
/// the socket readable, and NIO's listening channel stays registered for reading after a
/// failed accept, so the loop retried at once and spun a core for as long as the limit held
/// (measured: 100% of a core, 700,000 failed accepts a second). NIO's AcceptBackoffHandler
/// does not stop that (it only delays the next read request, and none comes), so this turns
/// autoRead off for a moment instead, which takes the socket out of epoll; nginx pauses its
/// accept events the same way. Out of files, a `relieve` given by the owner goes first: the
/// worker's answers the waiting connections itself (`OverflowRefusal`), and no pause is
/// needed when it could. Either is logged, at most once per `warningPeriod`.
public final class AcceptPause: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = any Channel
    public typealias InboundOut = any Channel

    /// Long enough that a full process costs ten failing accepts a second, short enough that
    /// a freed slot is used at once by a human's measure.
    public static let interval: TimeAmount = .milliseconds(100)
    public static let warningPeriod: TimeAmount = .seconds(10)

    /// Connections this process answered 503 for want of files, for its heartbeats: one
    /// count per process, whichever listening channel took them.
    private static let fileLimitRefusals = NIOLockedValueBox(0)
    public static var fileLimitRefusalsTotal: Int { fileLimitRefusals.withLockedValue { $0 } }
    /// Connections answered 503 for want of files by an accept path of another kind (the
    /// worker's own epoll loop).
    public static func count(fileLimitRefusals taken: Int) {
        fileLimitRefusals.withLockedValue { $0 += taken }
    }

    private let logger: Logger
    /// Called when accept() failed with EMFILE; returns how many waiting connections it
    /// took and answered itself, or nil when it could not (then the socket pauses).
    private let relieve: (() -> Int?)?
    private var resume: Scheduled<Void>?
    private var warnings = AcceptFailureWarnings()

    public init(logger: Logger, relieve: (() -> Int?)? = nil) {
        self.logger = logger
        self.relieve = relieve
    }

    /// For a `serverChannelInitializer`.
    public static func install(on channel: any Channel, logger: Logger, relieve: (() -> Int?)? = nil) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(AcceptPause(logger: logger, relieve: relieve))
        }
    }

    static func pausesAccepting(_ error: any Error) -> IOError? {
        guard let ioError = error as? IOError, Descriptors.acceptFailedForWantOfResources(ioError.errnoCode) else { return nil }
        return ioError
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let ioError = Self.pausesAccepting(error) else {
            context.fireErrorCaught(error)
            return
        }
        // (accept() fails with EMFILE even with nobody waiting, right after the last file
        // went: then `relieve` answers no one, which is fine.)
        if ioError.errnoCode == EMFILE, let relieve, let taken = relieve() {
            warnings.record(relieved: taken)
            Self.count(fileLimitRefusals: taken)
            warnIfDue(ioError)
            return
        }
        warnings.record(relieved: nil)
        warnIfDue(ioError)
        guard resume == nil, let options = context.channel.syncOptions else { return }
        do {
            try options.setOption(.autoRead, value: false)
        } catch {
            return  // closing: nothing left to pause
        }
        resume = context.eventLoop.assumeIsolated().scheduleTask(in: Self.interval) { [self] in
            resume = nil
            try? context.channel.syncOptions?.setOption(.autoRead, value: true)
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        resume?.cancel()
        resume = nil
        context.fireChannelInactive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        guard let resume else { return }
        resume.cancel()
        self.resume = nil
        try? context.channel.syncOptions?.setOption(.autoRead, value: true)
    }

    private func warnIfDue(_ error: IOError) {
        warnings.warnIfDue(errno: error.errnoCode, logger: logger)
    }
}

/// The warning of an accept path that failed for want of resources: at most one per
/// `AcceptPause.warningPeriod`, counting the failures and the connections answered 503
/// since the last one.
public struct AcceptFailureWarnings {
    private var failures = 0
    /// Connections answered 503 since the last warning; nil when none was answered so.
    private var relieved: Int?
    private var pace = LogPace(intervalSeconds: Double(AcceptPause.warningPeriod.nanoseconds) / 1e9)

    public init() {}

    /// One failed accept; `relieved`: the waiting connections it answered 503, if it could.
    public mutating func record(relieved taken: Int?) {
        failures += 1
        if let taken { relieved = (relieved ?? 0) + taken }
    }

    public mutating func warnIfDue(errno: Int32, logger: Logger) {
        guard pace.admit(now: monotonicSeconds()) != nil else { return }
        var metadata: Logger.Metadata = [
            "error": "\(String(cString: strerror(errno)))",
            "failures": "\(failures)",
        ]
        if let relieved {
            metadata["answered_503"] = "\(relieved)"
            logger.warning("accept failed; connections beyond the limit are answered 503", metadata: metadata)
        } else {
            metadata["retry_ms"] = "\(AcceptPause.interval.nanoseconds / 1_000_000)"
            logger.warning("accept failed; new connections wait in the listen queue", metadata: metadata)
        }
        failures = 0
        relieved = nil
    }
}
