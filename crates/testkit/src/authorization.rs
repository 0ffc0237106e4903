//! Envoy's ext_authz service of a test's own, where a test or a benchmark puts something else
//! than Keyshare's authorizer behind Envoy.

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};

/// Serves `service` on a port the system chose, with gRPC health SERVING as Envoy's health
/// checks of the shipped configuration expect; returns the port. It serves until the process
/// ends.
pub async fn serve_authorization<T: Authorization>(service: T) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(AuthorizationServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    port
}
