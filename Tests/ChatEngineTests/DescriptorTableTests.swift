import CChatEngine
import Foundation
import Glibc
import Testing

/// chatengine_reserve_descriptors grows the process's descriptor table once, up to the file
/// limit, and leaves no descriptor behind. (One test: the table never shrinks.)
@Suite struct DescriptorTableTests {
    /// The table's size now ("FDSize" in /proc/self/status).
    static func tableSize() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("FDSize:") })
        return try #require(Int(line.dropFirst("FDSize:".count).trimmingCharacters(in: .whitespaces)))
    }

    @Test func theTableHoldsTheReservedCountUpToTheLimitAndNothingStaysOpen() throws {
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        let before = try Self.tableSize()
        let wanted = Int(min(UInt64(before) * 4, UInt64(limit.rlim_cur)))
        try #require(wanted > before, "the file limit (\(limit.rlim_cur)) leaves no room to grow the table (\(before))")

        #expect(chatengine_reserve_descriptors(Int32(wanted)) == 0)
        #expect(try Self.tableSize() >= wanted)
        #expect(fcntl(Int32(wanted - 1), F_GETFD) == -1 && errno == EBADF)

        // More than the limit allows: up to the limit, no error.
        guard limit.rlim_cur < 1 << 20 else { return }
        #expect(chatengine_reserve_descriptors(Int32(limit.rlim_cur) + 1000) == 0)
        #expect(try Self.tableSize() >= Int(limit.rlim_cur))
    }
}
