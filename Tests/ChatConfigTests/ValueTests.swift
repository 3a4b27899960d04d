import Testing
@testable import ChatConfig

@Suite struct ValueTests {
    @Test(arguments: ["127.0.0.1:8080", "[::1]:8080", "localhost:8080", "0.0.0.0:0", "[fe80::1]:65535"])
    func listenAddressRoundTrips(_ text: String) throws {
        let address = try #require(ListenAddress(text))
        #expect(address.description == text)
    }

    @Test func listenAddressParts() {
        #expect(ListenAddress("[::1]:8080") == ListenAddress(host: "::1", port: 8080))
        #expect(ListenAddress("localhost:80") == ListenAddress(host: "localhost", port: 80))
    }

    @Test(arguments: ["", "8080", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:+80", "::1:8080",
                      "[::1]8080", "[127.0.0.1]:80", "example.com:80", "1.2.3:80", "127.0.0.1:-1"])
    func listenAddressRejects(_ text: String) {
        #expect(ListenAddress(text) == nil)
    }

    @Test func workerCount() {
        #expect(WorkerCount.auto.resolved(cores: 8) == 8)
        #expect(WorkerCount.auto.resolved(cores: 0) == 1)
        #expect(WorkerCount.auto.resolved(cores: 1000) == 256)
        #expect(WorkerCount.fixed(3).resolved(cores: 8) == 3)
        #expect(WorkerCount("auto") == .auto)
        #expect(WorkerCount("12") == .fixed(12))
        #expect(WorkerCount("many") == nil)
    }

    @Test func jsonRoundTrip() throws {
        var config = GatewayConfig()
        config.server.workers = .fixed(3)
        config.server.listen = ListenAddress(host: "::1", port: 9000)
        config.metrics.listen = nil
        config.limits.ratePerSecond = 2.5
        config.auth = .init()
        config.auth.mode = .jwt
        config.auth.jwtSecret = "0123456789abcdef0123456789abcdef"
        config.log.level = .trace
        let json = config.encodedJSON()
        #expect(!json.contains("\n"))
        #expect(json.contains(#""workers":3"#))
        #expect(try GatewayConfig.decodeFromEnvironmentJSON(json) == config)
        #expect(try GatewayConfig.decodeFromEnvironmentJSON(GatewayConfig().encodedJSON()) == GatewayConfig())
        #expect(GatewayConfig().encodedJSON().contains(#""workers":"auto""#))
    }

    @Test func badJSONIsAConfigError() {
        #expect(throws: ConfigError.self) { try GatewayConfig.decodeFromEnvironmentJSON("{\"server\": 1}") }
        var invalid = GatewayConfig()
        invalid.server.workers = .fixed(0)
        #expect(throws: ConfigError.self) { try GatewayConfig.decodeFromEnvironmentJSON(invalid.encodedJSON()) }
    }
}
