#if canImport(Glibc)
import Glibc
#endif
import ChatEngine
import ChatLink
import Logging
import NIOCore
import NIOPosix

/// The worker's side of its ChatEngine loop: takes each request the loop accepted and
/// either serves it on the loop or hands its descriptor, with the bytes already read, to
/// SwiftNIO and the worker's usual pipeline (`ConnectionPipeline`), where it is served as
/// if NIO had accepted it.
final class EngineFront: LoopApplication {
    private let worker: NIOLoopBound<Worker>
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let overflow: OverflowRefusal
    private var resumeAccepting: Scheduled<Void>?
    private var lastWarning: NIODeadline?

    init(worker: NIOLoopBound<Worker>, listenFD: Int32, eventLoop: any EventLoop, logger: Logger) {
        self.worker = worker
        self.eventLoop = eventLoop
        self.logger = logger
        overflow = OverflowRefusal(listenFD: listenFD)
    }

    func request(_ loop: Loop, fd: Int32, bytes: UnsafeMutableRawBufferPointer, parse: UpgradeParse) {
        handOff(loop, fd: fd, bytes: UnsafeRawBufferPointer(bytes))
    }

    func input(_ loop: Loop, fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        count
    }

    func closed(_ loop: Loop, fd: Int32) {}

    /// To NIO: the descriptor leaves the loop, and NIO's channel for it starts with the
    /// bytes the loop read.
    private func handOff(_ loop: Loop, fd: Int32, bytes: UnsafeRawBufferPointer) {
        let read = ByteBuffer(bytes: bytes)
        loop.handOff(fd)
        let worker = worker
        ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in ConnectionPipeline.configure(channel, worker: worker) }
            .withConnectedSocket(fd)
            .whenComplete { [logger] result in
                switch result {
                case .success(let channel):
                    let pipeline = channel.pipeline.syncOperations
                    pipeline.fireChannelRead(NIOAny(read))
                    pipeline.fireChannelReadComplete()
                case .failure(let error):
                    // Not closed here: whether NIO took the descriptor before failing cannot
                    // be told, and closing one it took could close another connection's.
                    logger.warning("could not hand a connection to NIO", metadata: ["error": "\(error)"])
                }
            }
    }

    /// Out of files: answer the waiting connections 503 from the reserve descriptor
    /// (`OverflowRefusal`), or, without one, stop accepting for a moment (a level-triggered
    /// listener with a connection waiting would otherwise wake the loop forever).
    func acceptFailed(_ loop: Loop, listener: Int32, errno error: Int32) {
        if error == EMFILE, let taken = overflow.refuseWaiting() {
            AcceptPause.count(fileLimitRefusals: taken)
            warnIfDue("out of files: answered waiting connections 503", taken)
            return
        }
        warnIfDue("accept failed (\(String(cString: strerror(error)))); pausing accepts", 0)
        guard resumeAccepting == nil else { return }
        loop.pauseAccepting()
        resumeAccepting = eventLoop.assumeIsolated().scheduleTask(in: AcceptPause.interval) { [self] in
            resumeAccepting = nil
            loop.resumeAccepting()
        }
    }

    private func warnIfDue(_ message: Logger.Message, _ refused: Int) {
        let now = NIODeadline.now()
        if let lastWarning, now - lastWarning < AcceptPause.warningPeriod { return }
        lastWarning = now
        logger.warning(message, metadata: ["refused": "\(refused)"])
    }
}
