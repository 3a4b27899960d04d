#if canImport(Glibc)
import Glibc
#endif
import CSystemShims

/// File descriptor plumbing for handing sockets to children across exec.
public enum Descriptors {
    /// The descriptor numbers a child finds its inherited sockets at.
    public static let childListenFD: Int32 = 3
    public static let childLinkFD: Int32 = 4

    /// Moves `fd` to a number >= `minimum` with close-on-exec set, closing the original.
    /// The master keeps its own descriptors above the fixed child slots (3, 4) so that
    /// `dup2` onto those slots in a spawned child never aliases a descriptor of ours.
    public static func moveAbove(_ fd: Int32, minimum: Int32 = 10) throws(SystemError) -> Int32 {
        if fd >= minimum {
            try setCloseOnExec(fd)
            return fd
        }
        let moved = fcntl(fd, F_DUPFD_CLOEXEC, minimum)
        guard moved >= 0 else { throw SystemError("fcntl(F_DUPFD_CLOEXEC)") }
        close(fd)
        return moved
    }

    public static func setCloseOnExec(_ fd: Int32) throws(SystemError) {
        let flags = fcntl(fd, F_GETFD)
        guard flags >= 0, fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == 0 else { throw SystemError("fcntl(F_SETFD)") }
    }

    public static func setNonBlocking(_ fd: Int32) throws(SystemError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else { throw SystemError("fcntl(F_SETFL)") }
    }

    /// Accepts one pending connection, non-blocking and close-on-exec; nil when none is waiting.
    public static func acceptNonBlocking(_ listenFD: Int32) -> Int32? {
        let fd = chatgw_accept_nonblocking(listenFD)
        return fd >= 0 ? fd : nil
    }

    /// Whether accept() failed for want of files, kernel memory or buffers: the waiting
    /// connection stays queued (and the socket readable), so the caller must pause rather
    /// than try again at once. ECONNABORTED (a client gone before it was taken) is not.
    public static func acceptFailedForWantOfResources(_ code: Int32) -> Bool {
        switch code {
        case EMFILE, ENFILE, ENOBUFS, ENOMEM: true
        default: false
        }
    }

    /// The uid of the peer process of a Unix socket.
    public static func peerUID(_ fd: Int32) -> uid_t? {
        let uid = chatgw_peer_uid(fd)
        return uid >= 0 ? uid_t(uid) : nil
    }

    /// A connected pair of Unix stream sockets, both close-on-exec and above the child slots.
    public static func socketPair() throws(SystemError) -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SystemError("socketpair")
        }
        return (try moveAbove(fds[0]), try moveAbove(fds[1]))
    }
}
