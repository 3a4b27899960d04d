import ChatBus
import Testing
@testable import ChatWorker

@Suite struct MemberRequestsTests {
    private func key(_ room: String, since: Int? = nil, epoch: String? = nil, history: Int = 0) -> MemberRequests.JoinKey {
        .init(room: room, since: since, epoch: epoch, history: history)
    }

    @Test func identicalJoinsShareOneRequestAndEveryMemberGetsItsAnswer() {
        var requests = MemberRequests()
        var answered: [Int] = []
        for member in 0..<3 {
            requests.join(key("live"), answer: { _, _ in answered.append(member) })
        }
        let taken = requests.take()
        #expect(taken.joins.count == 1)
        #expect(taken.joins.first?.key == key("live"))
        let snapshot = RoomSnapshot(name: "live", epoch: "e", seq: 7, members: 3)
        for answer in taken.joins[0].answers { answer(.success(JoinResult(room: snapshot, replay: [], gap: nil)), SharedJoinFrames()) }
        #expect(answered == [0, 1, 2])
        #expect(requests.isEmpty)
    }

    @Test func joinsThatAskForDifferentThingsStayApartInTheOrderFirstAsked() {
        var requests = MemberRequests()
        requests.join(key("b"), answer: { _, _ in })
        requests.join(key("a", since: 5, epoch: "e"), answer: { _, _ in })
        requests.join(key("a"), answer: { _, _ in })
        requests.join(key("a", history: 10), answer: { _, _ in })
        requests.join(key("b"), answer: { _, _ in })
        requests.join(key("a", since: 5, epoch: "e"), answer: { _, _ in })
        let taken = requests.take()
        #expect(taken.joins.map(\.key) == [key("b"), key("a", since: 5, epoch: "e"), key("a"), key("a", history: 10)])
        #expect(taken.joins.map(\.answers.count) == [2, 2, 1, 1])
    }

    @Test func theNextTickGathersAfreshWhateverTheLastOneHeld() {
        var requests = MemberRequests()
        requests.join(key("a"), answer: { _, _ in })
        requests.join(key("b"), answer: { _, _ in })
        requests.leave("a", members: 1)
        _ = requests.take()
        requests.join(key("b"), answer: { _, _ in })
        requests.join(key("b"), answer: { _, _ in })
        requests.join(key("a"), answer: { _, _ in })
        requests.leave("c", members: 2)
        requests.leave("a", members: 1)
        let taken = requests.take()
        #expect(taken.joins.map(\.key) == [key("b"), key("a")])
        #expect(taken.joins.map(\.answers.count) == [2, 1])
        #expect(taken.leaves.map(\.room) == ["c", "a"])
        #expect(taken.leaves.map(\.members) == [2, 1])
    }

    @Test func leavesOfARoomAreSummed() {
        var requests = MemberRequests()
        requests.leave("a", members: 1)
        requests.leave("b", members: 1)
        requests.leave("a", members: 1)
        #expect(!requests.isEmpty)
        let taken = requests.take()
        #expect(taken.leaves.map(\.room) == ["a", "b"])
        #expect(taken.leaves.map(\.members) == [2, 1])
        #expect(taken.joins.isEmpty)
        #expect(requests.isEmpty)
        #expect(requests.take().leaves.isEmpty)
    }
}
