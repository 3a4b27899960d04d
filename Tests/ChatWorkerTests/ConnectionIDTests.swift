import Testing
@testable import ChatWorker

@Suite struct ConnectionIDTests {
    /// `w<slot>-<n in hex>`, as the interpolation it replaced wrote it.
    @Test(arguments: [0, 1, 7, 12, 999, 12_345])
    func slotDashHexNumber(slot: Int) {
        for number: UInt64 in [1, 9, 10, 15, 16, 255, 256, 0xDEAD_BEEF, 1 << 40, UInt64.max] {
            #expect(Worker.connectionID(slot: slot, number: number) == "w\(slot)-\(String(number, radix: 16))")
        }
    }
}
