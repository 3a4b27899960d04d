import NIOCore

/// When each WebSocket connection of a worker last sent a frame: one contiguous table of
/// 16-byte rows, written by the WebSocket layer on every frame that comes in and read in
/// order by the worker's idle sweep (`IdleTable`, which also knows whose row is whose).
/// When the sweep read each session and its WebSocket handler instead, the cache misses
/// made it 95% of an idle worker's CPU (2% of a core for 20,000 idle connections, perf).
final class ActivityLog {
    struct Row {
        var lastHeard: NIODeadline
        /// A ping went out since the connection was last heard from.
        var pingSent: Bool
    }

    /// In row order; the idle sweep reads them and marks the pings it sends.
    var rows: [Row] = []
    private var free: [Int] = []

    /// A row for a new connection, heard from now (a freed row is reused).
    func add(now: NIODeadline) -> Int {
        let row = Row(lastHeard: now, pingSent: false)
        if let index = free.popLast() {
            rows[index] = row
            return index
        }
        rows.append(row)
        return rows.count - 1
    }

    func remove(_ index: Int) {
        free.append(index)
    }

    /// A frame came in on the connection of row `index`.
    func heard(_ index: Int, at now: NIODeadline) {
        rows[index].lastHeard = now
        rows[index].pingSent = false
    }
}
