import NIOCore
import Testing
@testable import ChatWorker

private final class Connection {}

private let start = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
private func at(_ seconds: Double) -> NIODeadline { start + .nanoseconds(Int64(seconds * 1e9)) }

@Suite struct IdleTableTests {
    @Test func pingsOnceAfterTheQuietPeriodAndClosesAfterTheTimeout() {
        let table = IdleTable<Connection>()
        let quiet = Connection()
        _ = table.add(quiet, now: at(0))
        let noSpread = TimeAmount.zero
        var due = table.due(now: at(29.9), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: noSpread)
        #expect(due.ping.isEmpty && due.close.isEmpty)
        due = table.due(now: at(30), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: noSpread)
        #expect(due.ping.count == 1 && due.ping[0] === quiet)
        due = table.due(now: at(45), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: noSpread)
        #expect(due.ping.isEmpty, "pinged twice without hearing back")
        due = table.due(now: at(60), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: noSpread)
        #expect(due.close.count == 1 && due.close[0] === quiet)
    }

    @Test func aFrameInPutsThePingOffAndAllowsTheNextOne() {
        let table = IdleTable<Connection>()
        let row = table.add(Connection(), now: at(0))
        #expect(table.due(now: at(30), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: .zero).ping.count == 1)
        table.heard(row, at: at(31))
        #expect(table.due(now: at(60), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: .zero).ping.isEmpty)
        #expect(table.due(now: at(61), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: .zero).ping.count == 1)
    }

    @Test func aRemovedRowIsNeverDueAndIsReusedFresh() {
        let table = IdleTable<Connection>()
        let gone = table.add(Connection(), now: at(0))
        table.remove(gone)
        var due = table.due(now: at(100), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: .zero)
        #expect(due.ping.isEmpty && due.close.isEmpty)
        let newcomer = Connection()
        #expect(table.add(newcomer, now: at(100)) == gone)
        due = table.due(now: at(101), pingAfter: .seconds(30), closeAfter: .seconds(60), spread: .zero)
        #expect(due.ping.isEmpty && due.close.isEmpty, "the reused row kept its old owner's silence")
    }

    @Test func neighbouringRowsArePingedAtScatteredOffsetsWithinTheSpread() {
        let spread = TimeAmount.seconds(1)
        let offsets = (0..<1_000).map { IdleTable<Connection>.offset(of: $0, spreadNs: UInt64(spread.nanoseconds)).nanoseconds }
        #expect(offsets.allSatisfy { $0 >= 0 && $0 < spread.nanoseconds })
        // Each tenth of the spread gets some of the 1,000 rows that joined together.
        let tenths = Set(offsets.map { $0 * 10 / spread.nanoseconds })
        #expect(tenths.count == 10)
        let firstTenth = offsets.filter { $0 < spread.nanoseconds / 10 }.count
        #expect(firstTenth > 50 && firstTenth < 150, "\(firstTenth) of 1,000 in the first tenth")
    }
}
