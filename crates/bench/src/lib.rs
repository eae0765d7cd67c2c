//! Helpers for bulkhead's benchmarks: percentiles and report tables.
//!
//! Every benchmark measures its baseline in the same run and reports ratios, because
//! absolute timings on a shared 2-core machine are noisy.

use std::time::Duration;

pub mod daemon;

/// Latency samples of one measurement.
#[derive(Debug, Clone)]
pub struct Samples {
    pub name: String,
    pub values: Vec<Duration>,
}

impl Samples {
    pub fn new(name: impl Into<String>) -> Samples {
        Samples {
            name: name.into(),
            values: Vec::new(),
        }
    }

    /// The `p`-th percentile (0..=100), nearest-rank.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.values.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    pub fn p99(&self) -> Duration {
        self.percentile(99.0)
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

pub fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

/// The value after `name` on a command line (`--write PATH`).
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The notify workload of the benchmarks (their binary's `notify-child` mode, and the
/// `notify-tiny` program): send READY=1 to $NOTIFY_SOCKET, then wait to be killed, or
/// end at once with `BENCH_EXIT_AFTER_READY` set (a launch through the API must outlive
/// its READY; elsewhere a short teardown is better). Only std, no runtime.
pub fn notify_child() -> ! {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let s = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        s.send_to(b"READY=1", path).expect("notify");
    }
    if std::env::var_os("BENCH_EXIT_AFTER_READY").is_some() {
        std::process::exit(0);
    }
    loop {
        // SAFETY: pause(2) has no preconditions; it returns only when a signal is caught.
        unsafe {
            libc::pause();
        }
    }
}

/// Terminates an instance through the API with its manifest's grace.
pub async fn terminate(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<()> {
    c.terminate(bulkhead_api::v1::TerminateRequest {
        id: id.into(),
        grace_ms: None,
        with_dependencies: false,
    })
    .await?;
    Ok(())
}

/// Waits (up to 30 s; benches call it outside their clock) until `workload`'s warm pool
/// has a ready slot, as `health` shows it.
pub async fn wait_for_slot(
    c: &mut bulkhead_api::BulkheadClient<tonic::transport::Channel>,
    workload: &str,
) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = c
            .health(bulkhead_api::v1::HealthRequest {})
            .await?
            .into_inner();
        if h.warm.iter().any(|w| w.workload == workload && w.ready > 0) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "the warm pool of {workload} stays empty"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `workload`'s spawns so far from a warm slot and cold (hits, misses), from the metrics
/// of a daemon running in the bench's process.
pub fn warm_launches(d: &bulkhead_daemon::Daemon, workload: &str) -> (u64, u64) {
    let sh = d.shared();
    let text = sh.metrics.encode(sh).unwrap_or_default();
    let count = |result: &str| -> u64 {
        let prefix =
            format!("bulkhead_warm_launches_total{{workload=\"{workload}\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (count("hit"), count("miss"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s = Samples::new("x");
        s.values = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(s.p50(), Duration::from_millis(50));
        assert_eq!(s.p99(), Duration::from_millis(99));
        assert_eq!(s.percentile(100.0), Duration::from_millis(100));
    }
}
