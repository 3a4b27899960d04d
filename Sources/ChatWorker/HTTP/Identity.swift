import ChatProtocol

/// Who a connection is, decided at the upgrade (auth mode `none`: the `user` query
/// parameter, or a generated guest name).
struct Identity {
    struct Problem {
        var code: String
        var message: String
        var jsonBody: String { #"{"code":"\#(code)","message":"\#(message)"}"# }
    }

    static func problem(in target: RequestTarget) -> Problem? {
        guard let user = target.query["user"], !user.isEmpty else { return nil }
        return Names.isValidUser(user) ? nil : Problem(code: "bad_user", message: "user names are 1 to 32 characters from [A-Za-z0-9_.-]")
    }

    static func user(in target: RequestTarget) -> String? {
        if problem(in: target) != nil { return nil }
        if let user = target.query["user"], !user.isEmpty { return String(user) }
        return "guest-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
    }
}
