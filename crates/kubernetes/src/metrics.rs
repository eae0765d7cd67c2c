//! Usage from the metrics API (`metrics.k8s.io/v1beta1`, served where a metrics server
//! runs): the container's working-set memory. CPU is not reported: the API gives a rate
//! (cores now), not the CPU time `Stats::cpu_seconds` is.
//!
//! `InstanceHandle::stats` is synchronous and cheap: it returns the last reading and, if
//! that is older than [`FRESH`], starts one `GET` in the background, so the API is asked
//! only as often as usage is (the cost follows the work). Where the API is missing (`404`,
//! `503`: no metrics server) the driver remembers it for [`RETRY_UNAVAILABLE`] and asks no
//! Pod's usage meanwhile; usage then reads zero, with the limits.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How old a reading may be before `stats` refreshes it.
pub const FRESH: Duration = Duration::from_secs(5);
/// How long an unavailable metrics API is not asked again.
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(60);

/// Whether the cluster serves the metrics API, shared by the driver's Pods.
#[derive(Default)]
pub struct Availability(Mutex<Option<Instant>>);

impl Availability {
    /// Whether it may be asked now.
    pub fn may_ask(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| at.elapsed() >= RETRY_UNAVAILABLE)
    }

    fn unavailable(&self, why: &str) {
        let mut at = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_none() {
            tracing::info!("kubernetes metrics API unavailable ({why}): pod usage is not reported");
        }
        *at = Some(Instant::now());
    }

    fn available(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The last reading of one Pod.
#[derive(Default)]
pub(crate) struct Reading {
    pub memory_bytes: u64,
    pub at: Option<Instant>,
    pub in_flight: bool,
}

/// The working-set memory of container `container` in a `PodMetrics` object.
pub fn memory_of(metrics: &serde_json::Value, container: &str) -> Option<u64> {
    let q = metrics["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?["usage"]["memory"]
        .as_str()?;
    bulkhead_core::size::parse(q).ok()
}

/// Reads one Pod's metrics; `None` when there are none (yet).
pub(crate) async fn fetch(
    client: &kube::Client,
    availability: &Availability,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Option<u64> {
    let req = http::Request::get(format!(
        "/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/{pod}"
    ))
    .body(Vec::new())
    .ok()?;
    match client.request::<serde_json::Value>(req).await {
        Ok(v) => {
            availability.available();
            memory_of(&v, container)
        }
        // A Pod too new to have been measured is a 404 too: only an API that does not
        // know the resource at all says the API is missing.
        Err(kube::Error::Api(s)) if s.code == 404 && !s.message.contains("podmetrics") => {
            availability.unavailable(&s.message);
            None
        }
        Err(kube::Error::Api(s)) if s.code == 503 => {
            availability.unavailable(&s.message);
            None
        }
        Err(e) => {
            tracing::debug!("metrics of pod {namespace}/{pod}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_set_is_read_from_pod_metrics() {
        let v = serde_json::json!({"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {"name": "p"}, "timestamp": "2026-12-03T20:00:00Z", "window": "15s",
            "containers": [{"name": "main", "usage": {"cpu": "1234567n", "memory": "2048Ki"}}]});
        assert_eq!(memory_of(&v, "main"), Some(2048 * 1024));
        assert_eq!(memory_of(&v, "other"), None);
    }
}
