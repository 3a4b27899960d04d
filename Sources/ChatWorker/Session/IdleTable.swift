import NIOCore

/// The worker's idle connections: which session owns each row of the WebSocket layer's
/// `ActivityLog`, and which of them are due a ping or a close. A session is only touched
/// when it is due. Generic over the owner so that it can be tested alone; the worker's
/// owner is `SessionHandler`.
final class IdleTable<Owner: AnyObject> {
    /// The rows the WebSocket layer writes; `owners` runs in step with them.
    let log = ActivityLog()
    private var owners: [Owner?] = []

    /// A row for a new connection, heard from now.
    func add(_ owner: Owner, now: NIODeadline) -> Int {
        let index = log.add(now: now)
        if index == owners.count {
            owners.append(owner)
        } else {
            owners[index] = owner
        }
        return index
    }

    func remove(_ index: Int) {
        owners[index] = nil
        log.remove(index)
    }

    /// A frame came in on the connection of row `index`.
    func heard(_ index: Int, at now: NIODeadline) {
        log.heard(index, at: now)
    }

    /// Owners quiet for `closeAfter`, and those quiet for `pingAfter` less their own
    /// offset in `0..<spread` (stable per row) that were not pinged since; the latter are
    /// marked pinged.
    func due(now: NIODeadline, pingAfter: TimeAmount, closeAfter: TimeAmount, spread: TimeAmount) -> (ping: [Owner], close: [Owner]) {
        var ping: [Owner] = [], close: [Owner] = []
        let spreadNs = UInt64(max(0, spread.nanoseconds))
        log.rows.withUnsafeMutableBufferPointer { rows in
            for index in rows.indices {
                let quiet = now - rows[index].lastHeard
                if quiet >= closeAfter {
                    if let owner = owners[index] { close.append(owner) }
                } else if !rows[index].pingSent, quiet >= pingAfter - spread,
                          quiet >= pingAfter - Self.offset(of: index, spreadNs: spreadNs) {
                    guard let owner = owners[index] else { continue }
                    rows[index].pingSent = true
                    ping.append(owner)
                }
            }
        }
        return (ping, close)
    }

    /// Rows of sessions that joined in one burst are neighbours: a multiplicative hash
    /// scatters their offsets over the spread.
    static func offset(of index: Int, spreadNs: UInt64) -> TimeAmount {
        guard spreadNs > 0 else { return .zero }
        let scattered = (UInt64(index) &* 0x9E37_79B9_7F4A_7C15) >> 16
        return .nanoseconds(Int64(scattered % spreadNs))
    }
}
