//! The standard gRPC services every stock tool expects, beside bulkhead's own:
//! `grpc.health.v1.Health` (tonic-health; for `grpc_health_probe`, load balancers and
//! orchestrators) and server reflection, v1 and v1alpha (tonic-reflection; for `grpcurl`
//! and UIs without the proto file). They are added to the Unix socket's server and to the
//! TCP listener's, behind the same [`crate::auth::AuthLayer`]: a workload is refused on
//! the socket, a token is needed over TCP, like for any other call.
//!
//! Health is the daemon's readiness, as `/ready` says it: `SERVING` for the overall
//! service (`""`) and for `bulkhead.v1.Bulkhead` while serving; `NOT_SERVING` while the
//! keeper is down, the state directory cannot be written, or shutdown has begun. It is
//! refreshed every [`REFRESH`], so `Watch` streams see changes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::Shared;

/// How often the health status follows the daemon's state.
pub const REFRESH: Duration = Duration::from_millis(500);

/// The service name bulkhead's own API has in the health service.
pub const API_SERVICE: &str = "bulkhead.v1.Bulkhead";

/// The health service's server side, shared by both listeners.
pub(crate) struct Standard {
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

/// Why the daemon is not ready, if it is not (what `/ready` answers 503 with).
pub(crate) fn not_ready(sh: &Shared) -> Option<String> {
    if sh.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return Some("shutting down".into());
    }
    if sh.keeper.as_ref().is_some_and(|k| !k.is_up()) {
        return Some("the keeper is down (a new one is starting)".into());
    }
    sh.events.fault().map(|f| f.to_string())
}

impl Standard {
    /// The services, and a task that keeps the health status current.
    pub(crate) fn start(sh: &Arc<Shared>) -> Standard {
        let reporter = HealthReporter::new();
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        tokio::spawn(follow(Arc::downgrade(sh), reporter));
        Standard { health }
    }

    pub(crate) fn health(
        &self,
    ) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
        self.health.clone()
    }

    /// Server reflection over bulkhead's API (and the health and reflection services).
    pub(crate) fn reflection_v1(
        &self,
    ) -> tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    > {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bulkhead_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the compiled-in descriptor sets are valid")
    }

    pub(crate) fn reflection_v1alpha(
        &self,
    ) -> tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    > {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bulkhead_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the compiled-in descriptor sets are valid")
    }
}

async fn set(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(API_SERVICE, status).await;
}

async fn follow(sh: Weak<Shared>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let Some(s) = sh.upgrade() else { return };
        let status = match not_ready(&s) {
            None => ServingStatus::Serving,
            Some(_) => ServingStatus::NotServing,
        };
        drop(s);
        if last != Some(status) {
            set(&reporter, status).await;
            last = Some(status);
        }
        tokio::time::sleep(REFRESH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_follows_readiness_like_ready_does() {
        let dir = std::path::PathBuf::from("/nonexistent");
        let cfg = crate::Config::new(dir.join("workloads"), Some(dir.join("state")), None);
        let sh = Arc::new(Shared::new(cfg, crate::events::EventLog::new(), None, None));
        assert_eq!(not_ready(&sh), None);
        let std = Standard::start(&sh);
        let mut client = tonic_health::pb::health_client::HealthClient::new(std.health());
        let check = |name: &str| tonic_health::pb::HealthCheckRequest {
            service: name.to_owned(),
        };
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
        // The follower sets both names at its first round.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.check(check(API_SERVICE)).await {
                assert_eq!(r.into_inner().status, serving);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sh.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(not_ready(&sh).as_deref(), Some("shutting down"));
        loop {
            let r = client.check(check("")).await.unwrap().into_inner();
            if r.status == not_serving {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
