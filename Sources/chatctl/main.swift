import ArgumentParser

/// The control CLI. The control socket and its commands arrive with the operations issue.
@main
struct ChatCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatctl",
        abstract: "Inspect and control a running chatgw master (not implemented yet: the control socket comes in a later release)."
    )

    @Argument(help: "status | workers | rooms | reload | stop | scale N | kick USER")
    var command: [String] = []

    func run() throws {
        print("chatctl: not implemented yet; use signals on the master meanwhile (HUP reload, TERM stop, QUIT drain, TTIN/TTOU scale).")
        throw ExitCode(1)
    }
}
