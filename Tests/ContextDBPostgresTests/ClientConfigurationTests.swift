@testable import ContextDBPostgres
import NIOSSL
import PostgresNIO
import Testing

/// `DBConnect(configuration:)` reads PostgresNIO's internal TLS setting by reflection: this fails
/// when a PostgresNIO version changes its shape, instead of every lease failing at run time.
@Suite struct ClientConfigurationTests {
    @Test func theTLSSettingOfAClientConfigurationIsRead() {
        let tls = TLSConfiguration.makeClientConfiguration()
        guard case .disable? = PostgresConnection.Configuration.tlsSetting(of: .disable),
              case .prefer? = PostgresConnection.Configuration.tlsSetting(of: .prefer(tls)),
              case .require? = PostgresConnection.Configuration.tlsSetting(of: .require(tls)) else {
            Issue.record("the TLS setting of PostgresClient.Configuration could not be read")
            return
        }
    }
}
