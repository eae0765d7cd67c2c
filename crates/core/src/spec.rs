//! Workload manifests: `<workloads>/<name>/manifest.yaml`, parsed and validated.
//!
//! Parsing is two steps. serde (through serde-saphyr, a maintained YAML parser with
//! built-in limits against alias bombs) checks the shape: types, unknown fields (every
//! struct denies them), enums, durations and signals. Then [`WorkloadSpec::validate`] checks
//! what serde cannot: names, non-empty commands, ports, thresholds, and fields that only
//! make sense together. Every error names the file, the field and the reason.
//!
//! The spec is data only; the daemon decides which drivers it has and resolves paths.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::duration::serde_duration;
use crate::key::Isolation;
use crate::name::{self, NameKind};
use crate::signal::Signal;

/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// Which driver runs a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A plain child process in its own process group.
    #[default]
    Process,
    /// Linux namespaces and cgroup limits.
    Sandbox,
    /// A Docker container through the Engine API.
    Docker,
    /// A Docker Swarm service, one per key (`crate::swarm`).
    Swarm,
    /// A Pod on a Kubernetes cluster through its API (`crate::kubernetes`).
    Kubernetes,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Process => "process",
            DriverKind::Sandbox => "sandbox",
            DriverKind::Docker => "docker",
            DriverKind::Swarm => "swarm",
            DriverKind::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated workload: what a manifest says, and what an instance is launched with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Must equal the name of the manifest's folder.
    pub name: String,
    /// A human description, shown by `bulkhead workloads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// argv; `${VAR}` is expanded from the instance environment. A relative program path
    /// resolves against the manifest's folder, which is also the working directory.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default, deserialize_with = "env_map")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub driver: DriverKind,
    #[serde(default)]
    pub isolation: Isolation,
    /// When an instance counts as ready. Absent: ready as soon as it is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,
    /// Probes that, failing, restart the instance per its policy. Run once it is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Liveness>,
    #[serde(default)]
    pub shutdown: Shutdown,
    /// When a stopped instance is started again, with backoff and a circuit breaker.
    #[serde(default)]
    pub restart: Restart,
    /// Terminate an instance that no lease has held for this long.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// `bulkhead up` launches it.
    #[serde(default)]
    pub autostart: bool,
    /// Limits enforced by the driver (cgroups for `sandbox`, the engine for `docker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The `sandbox` driver's walls; only with `driver: sandbox`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<crate::sandbox::SandboxSpec>,
    /// The `docker` driver's container; required with `driver: docker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<crate::docker::DockerSpec>,
    /// The `swarm` driver's service; required with `driver: swarm` (`crate::swarm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<crate::swarm::SwarmSpec>,
    /// The `kubernetes` driver's Pod; required with `driver: kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kubernetes::KubernetesSpec>,
    /// Shared-memory channels (the data plane), created before each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<crate::channels::Channels>,
    /// The instance log's rotation (absent: the daemon's `--log-max-bytes`, one rotated
    /// file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogSettings>,
    // Dependencies (`crate::deps`): launched for the derived key before this workload,
    // each gated on its condition; the graph is checked across manifests by the catalog.
    #[serde(default, skip_serializing_if = "crate::deps::DependsOn::is_empty")]
    pub depends_on: crate::deps::DependsOn,
    #[serde(
        default,
        skip_serializing_if = "crate::deps::OnDependencyRestart::is_ignore"
    )]
    pub on_dependency_restart: crate::deps::OnDependencyRestart,
    // The process basics (`crate::execution`: meaning per driver, validation).
    /// Where the instance starts: absolute, or relative to the manifest's folder (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// dotenv files read at each start (`crate::envfile`); `env` wins over them.
    #[serde(
        default,
        deserialize_with = "crate::execution::one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env_file: Vec<String>,
    /// The user (name or id) the instance runs as.
    #[serde(
        default,
        deserialize_with = "crate::execution::opt_principal",
        skip_serializing_if = "Option::is_none"
    )]
    pub user: Option<String>,
    /// Its primary group (default: the user's).
    #[serde(
        default,
        deserialize_with = "crate::execution::opt_principal",
        skip_serializing_if = "Option::is_none"
    )]
    pub group: Option<String>,
    /// Supplementary groups, besides the user's own from the group database.
    #[serde(
        default,
        deserialize_with = "crate::execution::principals",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub groups: Vec<String>,
    /// rlimits by name (`nofile`, `core`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, crate::execution::Limit>,
    /// An octal string (`"0027"`); default: the daemon's.
    #[serde(
        default,
        deserialize_with = "crate::execution::opt_umask",
        skip_serializing_if = "Option::is_none"
    )]
    pub umask: Option<String>,
    /// Listening sockets the daemon binds and keeps across restarts, handed over as
    /// `LISTEN_FDS` (see [`crate::sockets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<Vec<crate::sockets::SocketSpec>>,
    /// When an instance starts: on launch (default) or on its first connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<crate::sockets::Activation>,
    /// Instances prepared ahead of their launch (`crate::warm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<crate::warm::Warm>,
}

/// How an instance's log rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// The size at which the log rotates (`8Mi`); at least 4 KiB.
    #[serde(
        default,
        with = "crate::size::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size: Option<u64>,
    /// Rotated files kept besides the current one, 1 to [`MAX_LOG_GENERATIONS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

/// The most rotated log files a workload may keep.
pub const MAX_LOG_GENERATIONS: u32 = 100;

/// Resource limits of one instance.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU time in cores (`0.5` is half of one core), enforced as a quota per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory limit (`512Mi`); swap is not allowed on top of it.
    #[serde(
        default,
        with = "crate::size::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<u64>,
    /// The most processes (and threads) the instance may have at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// CPUs the instance may run on, in the kernel's list syntax (`0-1,3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<String>,
}

/// The smallest memory limit accepted: below it nothing starts.
pub const MIN_MEMORY: u64 = 1 << 20;

impl Resources {
    /// Checks the limits. On error returns the field path (under `resources`) and reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail =
            |field: &str, reason: &str| Err((format!("resources.{field}"), reason.to_owned()));
        if let Some(c) = self.cpu {
            if !(c.is_finite() && (0.01..=1024.0).contains(&c)) {
                return fail("cpu", "must be a number of cores between 0.01 and 1024");
            }
        }
        if let Some(m) = self.memory {
            if m < MIN_MEMORY {
                return fail("memory", "must be at least 1Mi");
            }
        }
        if self.pids == Some(0) {
            return fail("pids", "must be at least 1");
        }
        if let Some(set) = &self.cpuset {
            if !valid_cpu_list(set) {
                return fail(
                    "cpuset",
                    "must be a list of CPU numbers and ranges, like 0-1,3",
                );
            }
        }
        Ok(())
    }
}

/// Whether `s` is a kernel CPU list: comma-separated numbers and ascending ranges.
fn valid_cpu_list(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.split(',').all(|part| {
            let num =
                |n: &str| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit());
            match part.split_once('-') {
                Some((a, b)) => num(a) && num(b) && a.parse::<u32>().ok() <= b.parse::<u32>().ok(),
                None => num(part),
            }
        })
}

/// Readiness: every configured signal must pass (notify AND each probe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// Wait for `READY=1` on `$NOTIFY_SOCKET` (the sd_notify protocol).
    #[serde(default)]
    pub notify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// The backstop: a launch that is not ready after this long fails and is stopped.
    #[serde(default = "default_ready_timeout", with = "serde_duration")]
    pub timeout: Duration,
    /// The sd_notify watchdog: the instance gets `WATCHDOG_USEC` and must send
    /// `WATCHDOG=1` at least this often, from its start on; a miss (or `WATCHDOG=trigger`)
    /// stops it with `watchdog_signal` and is a failed run.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub watchdog: Option<Duration>,
    /// What a missed watchdog sends (then SIGKILL after the shutdown grace), as systemd's
    /// `WatchdogSignal=`.
    #[serde(default = "abrt")]
    pub watchdog_signal: Signal,
}

fn abrt() -> Signal {
    Signal::parse("ABRT").unwrap_or(Signal::KILL)
}

/// Liveness: any probe failing `failure_threshold` times in a row stops the instance,
/// and its restart policy applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Liveness {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
}

/// serde for an optional duration field.
pub(crate) mod opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        crate::duration::serde_duration::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => crate::duration::serde_duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Probe timing, in the Kubernetes vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeTiming {
    /// Wait this long after start before the first attempt.
    #[serde(default, with = "serde_duration")]
    pub initial_delay: Duration,
    /// Time between the starts of two attempts.
    #[serde(default = "default_period", with = "serde_duration")]
    pub period: Duration,
    /// One attempt fails if it takes longer than this.
    #[serde(default = "default_probe_timeout", with = "serde_duration")]
    pub timeout: Duration,
    /// Consecutive successes needed to pass.
    #[serde(default = "one")]
    pub success_threshold: u32,
    /// Consecutive failures that count as failing (reported after readiness; before it,
    /// only the readiness `timeout` ends a launch).
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// Time between attempts of a readiness probe once the instance is ready (default:
    /// [`DEFAULT_READY_PERIOD`], or `period` if that is longer): a probe that polls fast
    /// to notice readiness need not poll that fast for ever.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_period: Option<Duration>,
}

/// How often a readiness probe runs once the instance is ready, unless set.
pub const DEFAULT_READY_PERIOD: Duration = Duration::from_secs(10);

impl ProbeTiming {
    /// The period of a readiness probe once the instance is ready.
    pub fn period_when_ready(&self) -> Duration {
        self.ready_period
            .unwrap_or(DEFAULT_READY_PERIOD.max(self.period))
    }
}

impl Default for ProbeTiming {
    fn default() -> Self {
        ProbeTiming {
            initial_delay: Duration::ZERO,
            period: default_period(),
            timeout: default_probe_timeout(),
            success_threshold: 1,
            failure_threshold: 3,
            ready_period: None,
        }
    }
}

fn default_period() -> Duration {
    Duration::from_millis(100)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// `GET http://127.0.0.1:<port><path>`; a status from 200 to 399 passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    #[serde(default = "root_path")]
    pub path: String,
    /// Default: the instance's `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `http` or `https` (as Kubernetes: the certificate is not verified).
    #[serde(default)]
    pub scheme: Scheme,
    /// The address to connect to (default `127.0.0.1`).
    #[serde(default = "localhost")]
    pub host: String,
    /// Extra request headers (`Host` among them replaces the default).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_period", with = "serde_duration")]
    pub period: Duration,
    #[serde(default, with = "serde_duration")]
    pub initial_delay: Duration,
    #[serde(default = "default_probe_timeout", with = "serde_duration")]
    pub timeout: Duration,
    #[serde(default = "one")]
    pub success_threshold: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// See [`ProbeTiming::ready_period`].
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_period: Option<Duration>,
}

fn root_path() -> String {
    "/".to_owned()
}

fn localhost() -> String {
    "127.0.0.1".to_owned()
}

/// An HTTP probe's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

/// A TCP connect to `127.0.0.1:<port>` passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// Default: the instance's `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_period", with = "serde_duration")]
    pub period: Duration,
    #[serde(default, with = "serde_duration")]
    pub initial_delay: Duration,
    #[serde(default = "default_probe_timeout", with = "serde_duration")]
    pub timeout: Duration,
    #[serde(default = "one")]
    pub success_threshold: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// See [`ProbeTiming::ready_period`].
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_period: Option<Duration>,
}

/// Runs a command with the instance's environment in its folder; exit 0 passes.
/// Written either as an argv list (`exec: [./check.sh]`) or as a map with `command:`
/// and timing fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecProbe {
    pub command: Vec<String>,
    #[serde(flatten)]
    pub timing: ProbeTiming,
}

impl<'de> Deserialize<'de> for ExecProbe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ExecProbe, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            command: Vec<String>,
            #[serde(default, with = "serde_duration")]
            initial_delay: Duration,
            #[serde(default = "default_period", with = "serde_duration")]
            period: Duration,
            #[serde(default = "default_probe_timeout", with = "serde_duration")]
            timeout: Duration,
            #[serde(default = "one")]
            success_threshold: u32,
            #[serde(default = "three")]
            failure_threshold: u32,
            #[serde(default, with = "opt_duration")]
            ready_period: Option<Duration>,
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = ExecProbe;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an argv list, or a map with `command` and probe timing")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<ExecProbe, A::Error> {
                let command =
                    Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(ExecProbe {
                    command,
                    timing: ProbeTiming::default(),
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<ExecProbe, A::Error> {
                let l = Long::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ExecProbe {
                    command: l.command,
                    timing: ProbeTiming {
                        initial_delay: l.initial_delay,
                        period: l.period,
                        timeout: l.timeout,
                        success_threshold: l.success_threshold,
                        failure_threshold: l.failure_threshold,
                        ready_period: l.ready_period,
                    },
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl HttpProbe {
    pub fn timing(&self) -> ProbeTiming {
        ProbeTiming {
            initial_delay: self.initial_delay,
            period: self.period,
            timeout: self.timeout,
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
            ready_period: self.ready_period,
        }
    }
}

impl TcpProbe {
    pub fn timing(&self) -> ProbeTiming {
        ProbeTiming {
            initial_delay: self.initial_delay,
            period: self.period,
            timeout: self.timeout,
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
            ready_period: self.ready_period,
        }
    }
}

/// How an instance is stopped: `signal` to its whole process group, then after `grace`
/// SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    #[serde(default = "term")]
    pub signal: Signal,
    #[serde(default = "default_grace", with = "serde_duration")]
    pub grace: Duration,
}

fn term() -> Signal {
    Signal::TERM
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            signal: Signal::TERM,
            grace: default_grace(),
        }
    }
}

/// When a stopped instance is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Never,
    OnFailure,
    Always,
}

/// Restart policy, backoff and circuit breaker (see the supervision docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default)]
    pub policy: RestartPolicy,
    #[serde(default)]
    pub backoff: Backoff,
    /// An instance up this long resets the backoff and failure count.
    #[serde(default = "default_reset_after", with = "serde_duration")]
    pub reset_after: Duration,
    /// Consecutive failed runs that open the circuit breaker.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long an open breaker waits before one trial run.
    #[serde(default = "default_cooldown", with = "serde_duration")]
    pub cooldown: Duration,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::Never,
            backoff: Backoff::default(),
            reset_after: default_reset_after(),
            max_failures: default_max_failures(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_reset_after() -> Duration {
    Duration::from_secs(60)
}
fn default_max_failures() -> u32 {
    5
}
fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_initial", with = "serde_duration")]
    pub initial: Duration,
    #[serde(default = "default_max_backoff", with = "serde_duration")]
    pub max: Duration,
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Fraction of the delay drawn at random, 0 to 1.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_initial(),
            max: default_max_backoff(),
            factor: default_factor(),
            jitter: default_jitter(),
        }
    }
}

fn default_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_factor() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.2
}

/// Environment values may be written as strings, numbers or booleans.
fn env_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Scalar(String);
    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
            struct V;
            impl de::Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string, number or boolean")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_owned()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let m = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// A manifest is invalid.
///
/// Its `Display` (and [`ManifestError::reason`]) may quote the file: a YAML error shows the
/// offending source lines, a validation error may show a value. That is for the daemon's
/// owner and admins; [`ManifestError::redacted`] is what anyone else may see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{reason}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ManifestError {
    /// The manifest's path as the daemon found it.
    pub file: String,
    /// The field, as a dotted path, when the error is about one field.
    pub field: Option<String>,
    /// Line and column (from 1), when known.
    pub position: Option<(u64, u64)>,
    /// What is wrong, in full (may quote the file).
    pub reason: String,
    /// What kind of problem it is: the generic reason of [`ManifestError::redacted`].
    pub kind: ManifestErrorKind,
}

/// The kinds of [`ManifestError`], each with a reason that quotes nothing of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestErrorKind {
    /// Larger than [`MAX_MANIFEST_BYTES`].
    TooLarge,
    /// Not YAML, or YAML that does not have a manifest's shape (serde-saphyr's error).
    Syntax,
    /// A YAML tag (`!!binary`, `!custom`): refused, never silently ignored.
    Tag,
    /// A field's value is not acceptable.
    Invalid,
}

impl ManifestErrorKind {
    /// The generic reason: says what kind of problem, quotes nothing.
    pub fn generic_reason(self) -> &'static str {
        match self {
            ManifestErrorKind::TooLarge => "the file is larger than the manifest size limit",
            ManifestErrorKind::Syntax => "not a valid manifest (YAML syntax or structure)",
            ManifestErrorKind::Tag => "YAML tags are not allowed in a manifest",
            ManifestErrorKind::Invalid => "invalid value",
        }
    }
}

impl ManifestError {
    /// The error without anything of the file's contents (no source snippet, no value,
    /// no tag text): the file, the field or position, and a generic reason. What a caller
    /// who may not read the file (a non-admin token) is shown.
    pub fn redacted(&self) -> String {
        let mut out = format!("{}: ", self.file);
        if let Some(f) = &self.field {
            out.push_str(&format!("field `{f}`: "));
        }
        if let Some((line, col)) = self.position {
            out.push_str(&format!("line {line} column {col}: "));
        }
        out.push_str(self.kind.generic_reason());
        out.push_str(" (details are shown to admins)");
        out
    }
}

/// A YAML tag found by [`find_tag`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagFound {
    /// The tag as written (`!!binary`, `!custom`), escaped and shortened.
    pub tag: String,
    /// The field path of the tagged node (`command`, `env.A`, `command[1]`); `None` for
    /// the document itself.
    pub field: Option<String>,
    /// Line and column (from 1) of the tag.
    pub position: (u64, u64),
}

/// One open collection while scanning, for the field path.
enum Frame {
    /// A mapping: the current key (once read) and whether the value is being read.
    Map { key: Option<String>, in_value: bool },
    /// A sequence: the index of the current item.
    Seq(usize),
}

/// The first node with an explicit YAML tag (`!!str`, `!!binary`, `!custom`, verbatim
/// `!<...>`), if any. serde-saphyr decodes some tags (`!!binary` into a string) and
/// ignores the others, so a manifest could mean something else than it reads; bulkhead
/// refuses them all. Scans the parser's events (no alias expansion, no recursion); a
/// syntax error ends the scan (the deserializer reports it).
pub fn find_tag(text: &str) -> Option<TagFound> {
    use serde_saphyr::granit_parser::{Event, Options, Parser};
    let mut opts = Options::default();
    opts.emit_comments = false;
    let mut stack: Vec<Frame> = Vec::new();
    // A map key (not its value) is being read: it ends a key/value pair only as a value.
    let path = |stack: &[Frame], key_node: Option<&str>| -> Option<String> {
        let mut p = String::new();
        for f in stack {
            match f {
                Frame::Map {
                    key,
                    in_value: true,
                } => {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(key.as_deref().unwrap_or("?"));
                }
                Frame::Map {
                    in_value: false, ..
                } => {}
                Frame::Seq(i) => p.push_str(&format!("[{i}]")),
            }
        }
        if let Some(k) = key_node {
            if !p.is_empty() {
                p.push('.');
            }
            p.push_str(k);
        }
        (!p.is_empty()).then_some(p)
    };
    // A node (scalar, alias or a whole collection) ended: advance its parent.
    fn node_done(stack: &mut [Frame]) {
        match stack.last_mut() {
            Some(Frame::Map { key, in_value }) => {
                if *in_value {
                    *key = None;
                }
                *in_value = !*in_value;
            }
            Some(Frame::Seq(i)) => *i += 1,
            None => {}
        }
    }
    for ev in Parser::new_from_str_with_options(text, opts) {
        let Ok((ev, span)) = ev else {
            return None;
        };
        let (tag, scalar) = match &ev {
            Event::Scalar(v, _, _, tag) => (tag.as_deref(), Some(v.as_ref())),
            Event::SequenceStart(_, _, tag) | Event::MappingStart(_, _, tag) => {
                (tag.as_deref(), None)
            }
            _ => (None, None),
        };
        let is_key = matches!(
            stack.last(),
            Some(Frame::Map {
                in_value: false,
                ..
            })
        );
        if let Some(tag) = tag {
            let shown_key = scalar.filter(|_| is_key).map(field_name);
            let mark = span.tag_start.unwrap_or(span.start);
            return Some(TagFound {
                tag: name::show(&if tag.original_handle().is_empty() {
                    format!("!<{}>", tag.suffix())
                } else {
                    format!("{}{}", tag.original_handle(), tag.suffix())
                }),
                field: path(&stack, shown_key.as_deref()),
                position: (mark.line() as u64, mark.col() as u64 + 1),
            });
        }
        match ev {
            Event::Scalar(v, ..) => {
                if let Some(Frame::Map {
                    key,
                    in_value: false,
                }) = stack.last_mut()
                {
                    *key = Some(field_name(&v));
                }
                node_done(&mut stack);
            }
            Event::Alias(_) => node_done(&mut stack),
            Event::SequenceStart(..) => stack.push(Frame::Seq(0)),
            Event::MappingStart(..) => stack.push(Frame::Map {
                key: None,
                in_value: false,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
                node_done(&mut stack);
            }
            _ => {}
        }
    }
    None
}

/// A mapping key as a field path component: as written when it is a plain name, else
/// escaped and shortened.
fn field_name(k: &str) -> String {
    if !k.is_empty()
        && k.len() <= 64
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        k.to_owned()
    } else {
        name::show(k)
    }
}

/// Variables bulkhead sets itself; a manifest may not override them.
pub const RESERVED_ENV: &[&str] = &[
    "PORT",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "BULKHEAD_INSTANCE",
    "BULKHEAD_WORKLOAD",
    "BULKHEAD_NAMESPACE",
    "BULKHEAD_SESSION",
    crate::channels::ENV_IOX2_PREFIX,
    crate::channels::ENV_IOX2_ROOT,
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Parses and validates a manifest. `file` is used in errors; `folder` is the name of the
/// directory the manifest sits in, which the workload's `name` must equal.
pub fn parse_manifest(file: &str, folder: &str, text: &str) -> Result<WorkloadSpec, ManifestError> {
    let err = |kind, field: Option<&str>, reason: String| ManifestError {
        file: file.to_owned(),
        field: field.map(str::to_owned),
        position: None,
        reason,
        kind,
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(err(
            ManifestErrorKind::TooLarge,
            None,
            format!(
                "is {} bytes, more than the limit of {MAX_MANIFEST_BYTES}",
                text.len()
            ),
        ));
    }
    // Before deserialising: serde-saphyr would decode `!!binary` and ignore other tags.
    if let Some(t) = find_tag(text) {
        let (line, col) = t.position;
        return Err(ManifestError {
            position: Some(t.position),
            ..err(
                ManifestErrorKind::Tag,
                t.field.as_deref(),
                format!(
                    "YAML tag {} at line {line} column {col}: tags are not allowed in a manifest \
                     (quote the value to give it as a string)",
                    t.tag
                ),
            )
        });
    }
    let spec: WorkloadSpec = serde_saphyr::from_str(text).map_err(|e| {
        // serde-saphyr renders the location and a snippet; keep the message on few lines.
        ManifestError {
            position: e.location().map(|l| (l.line(), l.column())),
            ..err(
                ManifestErrorKind::Syntax,
                None,
                e.to_string().trim_end().to_owned(),
            )
        }
    })?;
    spec.validate()
        .map_err(|(field, reason)| err(ManifestErrorKind::Invalid, Some(&field), reason))?;
    if spec.name != folder {
        return Err(err(
            ManifestErrorKind::Invalid,
            Some("name"),
            format!(
                "is {} but the manifest is in folder {}: they must match",
                name::show(&spec.name),
                name::show(folder)
            ),
        ));
    }
    Ok(spec)
}

impl WorkloadSpec {
    /// Checks what serde cannot. On error returns the field path and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, reason: String| Err((field.to_owned(), reason));
        if let Err(e) = name::validate(NameKind::Workload, &self.name) {
            return fail("name", e.reason.to_owned());
        }
        if self.command.is_empty() {
            return fail(
                "command",
                "must name a program (an argv list, not empty)".into(),
            );
        }
        for (i, arg) in self.command.iter().enumerate() {
            if arg.contains('\0') {
                return fail(&format!("command[{i}]"), "contains a NUL byte".into());
            }
        }
        if self.command[0].is_empty() {
            return fail("command[0]", "program must not be empty".into());
        }
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            if k.is_empty()
                || k.contains('=')
                || k.contains('\0')
                || k.as_bytes()[0].is_ascii_digit()
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return fail(
                    &field,
                    "variable names may only contain ASCII letters, digits and '_', not starting with a digit".into(),
                );
            }
            if v.contains('\0') {
                return fail(&field, "value contains a NUL byte".into());
            }
            if RESERVED_ENV.contains(&k.as_str()) || k.starts_with(crate::channels::ENV_PREFIX) {
                return fail(
                    &field,
                    format!("{k} is set by bulkhead and cannot be overridden"),
                );
            }
        }
        if let Some(r) = &self.readiness {
            if !r.notify && r.http.is_none() && r.tcp.is_none() && r.exec.is_none() {
                return fail(
                    "readiness",
                    "names no signal: set notify: true and/or an http, tcp or exec probe".into(),
                );
            }
            if r.timeout.is_zero() {
                return fail("readiness.timeout", "must be greater than zero".into());
            }
            if let Some(w) = r.watchdog {
                if !r.notify {
                    return fail(
                        "readiness.watchdog",
                        "needs notify: true (WATCHDOG=1 is an sd_notify message)".into(),
                    );
                }
                if w < Duration::from_millis(10) {
                    return fail("readiness.watchdog", "must be at least 10ms".into());
                }
            }
            check_probes(
                "readiness",
                r.http.as_ref(),
                r.tcp.as_ref(),
                r.exec.as_ref(),
            )?;
        }
        if let Some(l) = &self.liveness {
            if l.http.is_none() && l.tcp.is_none() && l.exec.is_none() {
                return fail(
                    "liveness",
                    "names no probe: set an http, tcp or exec probe".into(),
                );
            }
            check_probes("liveness", l.http.as_ref(), l.tcp.as_ref(), l.exec.as_ref())?;
        }
        if let Some(r) = &self.resources {
            r.validate()?;
        }
        if let Some(l) = &self.logs {
            if l.max_size.is_some_and(|m| m < 4096) {
                return Err(("logs.max_size".into(), "must be at least 4Ki".into()));
            }
            if l.keep.is_some_and(|k| k == 0 || k > MAX_LOG_GENERATIONS) {
                return Err((
                    "logs.keep".into(),
                    format!("must be between 1 and {MAX_LOG_GENERATIONS}"),
                ));
            }
        }
        if let Some(c) = &self.channels {
            c.validate(&self.name).map_err(|(f, r)| {
                let field = if f.is_empty() {
                    "channels".to_owned()
                } else {
                    format!("channels.{f}")
                };
                (field, r)
            })?;
        }
        match (&self.sandbox, self.driver) {
            (Some(_), d) if d != DriverKind::Sandbox => {
                return fail(
                    "sandbox",
                    format!(
                        "is only allowed with driver: sandbox (this workload uses driver: {d})"
                    ),
                );
            }
            (Some(sb), _) => sb
                .validate()
                .map_err(|(f, r)| (format!("sandbox.{f}"), r))?,
            (None, _) => {}
        }
        match (&self.docker, self.driver) {
            (Some(_), d) if d != DriverKind::Docker => {
                return fail(
                    "docker",
                    format!("is only allowed with driver: docker (this workload uses driver: {d})"),
                );
            }
            (Some(dk), _) => dk.validate().map_err(|(f, r)| (format!("docker.{f}"), r))?,
            (None, DriverKind::Docker) => {
                return fail(
                    "docker",
                    "is required with driver: docker (set docker.image or docker.build)".into(),
                );
            }
            (None, _) => {}
        }
        crate::swarm::validate(self)?;
        // `driver: kubernetes`: its section, and what a Pod cannot honour.
        crate::kubernetes::validate(self)?;
        crate::execution::validate(self)?;
        crate::warm::validate(self)?;
        crate::sockets::validate(
            self.sockets.as_deref(),
            self.activation.as_ref(),
            self.isolation,
            self.driver,
        )?;
        if self.idle_timeout == Some(Duration::ZERO) {
            return fail(
                "idle_timeout",
                "must be greater than zero (leave it out for no idle timeout)".into(),
            );
        }
        let b = &self.restart.backoff;
        if !(b.factor.is_finite() && b.factor >= 1.0 && b.factor <= 100.0) {
            return fail("restart.backoff.factor", "must be between 1 and 100".into());
        }
        if !(b.jitter.is_finite() && (0.0..=1.0).contains(&b.jitter)) {
            return fail("restart.backoff.jitter", "must be between 0 and 1".into());
        }
        if b.initial > b.max {
            return fail(
                "restart.backoff.initial",
                "must not be greater than restart.backoff.max".into(),
            );
        }
        if self.restart.max_failures == 0 {
            return fail("restart.max_failures", "must be at least 1".into());
        }
        crate::deps::validate(&self.name, &self.depends_on)?;
        if !self.on_dependency_restart.is_ignore() && self.depends_on.is_empty() {
            return fail(
                "on_dependency_restart",
                "is only meaningful with depends_on".into(),
            );
        }
        if self.autostart && self.isolation == Isolation::Session {
            return fail(
                "autostart",
                "a session-isolated workload cannot be autostarted (there is no session at start-up)".into(),
            );
        }
        Ok(())
    }
}

/// Checks the probes of a `readiness` or `liveness` section (`section` is its name).
fn check_probes(
    section: &str,
    http: Option<&HttpProbe>,
    tcp: Option<&TcpProbe>,
    exec: Option<&ExecProbe>,
) -> Result<(), (String, String)> {
    let fail = |field: &str, reason: &str| Err((format!("{section}.{field}"), reason.to_owned()));
    if let Some(h) = http {
        if !h.path.starts_with('/') {
            return fail("http.path", "must start with '/'");
        }
        if h.path.chars().any(|c| c.is_control() || c == ' ') {
            return fail("http.path", "must not contain spaces or control characters");
        }
        check_port(&format!("{section}.http.port"), h.port)?;
        if h.host.is_empty()
            || h.host
                .chars()
                .any(|c| c.is_control() || c == ' ' || c == '/')
        {
            return fail("http.host", "must be a host name or address");
        }
        for (name, value) in &h.headers {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token) {
                return Err((
                    format!("{section}.http.headers.{name}"),
                    "is not a valid header name".into(),
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err((
                    format!("{section}.http.headers.{name}"),
                    "must not contain control characters".into(),
                ));
            }
        }
        check_timing(&format!("{section}.http"), &h.timing())?;
    }
    if let Some(t) = tcp {
        check_port(&format!("{section}.tcp.port"), t.port)?;
        check_timing(&format!("{section}.tcp"), &t.timing())?;
    }
    if let Some(e) = exec {
        if e.command.first().is_none_or(|p| p.is_empty()) {
            return fail("exec.command", "must name a program");
        }
        check_timing(&format!("{section}.exec"), &e.timing)?;
    }
    Ok(())
}

fn check_port(field: &str, port: Option<u16>) -> Result<(), (String, String)> {
    if port == Some(0) {
        return Err((field.to_owned(), "must be between 1 and 65535".into()));
    }
    Ok(())
}

fn check_timing(prefix: &str, t: &ProbeTiming) -> Result<(), (String, String)> {
    let fail = |f: &str, reason: &str| Err((format!("{prefix}.{f}"), reason.to_owned()));
    if t.period < Duration::from_millis(1) {
        return fail("period", "must be at least 1ms");
    }
    if t.ready_period.is_some_and(|p| p < Duration::from_millis(1)) {
        return fail("ready_period", "must be at least 1ms");
    }
    if t.timeout.is_zero() {
        return fail("timeout", "must be greater than zero");
    }
    if t.success_threshold == 0 {
        return fail("success_threshold", "must be at least 1");
    }
    if t.failure_threshold == 0 {
        return fail("failure_threshold", "must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WorkloadSpec, ManifestError> {
        parse_manifest("w/web/manifest.yaml", "web", text)
    }

    #[test]
    fn log_rotation_is_per_workload_and_checked() {
        let s = parse("name: web\ncommand: [x]\nlogs: {max_size: 1Mi, keep: 5}\n").unwrap();
        assert_eq!(
            s.logs,
            Some(LogSettings {
                max_size: Some(1 << 20),
                keep: Some(5)
            })
        );
        for (bad, field) in [
            ("logs: {keep: 0}", "logs.keep"),
            ("logs: {keep: 101}", "logs.keep"),
            ("logs: {max_size: 100}", "logs.max_size"),
        ] {
            let e = parse(&format!("name: web\ncommand: [x]\n{bad}\n")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{bad}: {e}");
        }
    }

    #[test]
    fn depends_on_fields() {
        let s = parse("name: web\ncommand: [x]\ndepends_on: {db: {condition: started}}\non_dependency_restart: restart\n").unwrap();
        assert_eq!(
            s.depends_on.0["db"].condition,
            crate::deps::Condition::Started
        );
        assert_eq!(
            s.on_dependency_restart,
            crate::deps::OnDependencyRestart::Restart
        );
        let s = parse("name: web\ncommand: [x]\ndepends_on: [db, cache]\n").unwrap();
        assert_eq!(s.depends_on.0.len(), 2);
        assert!(s.on_dependency_restart.is_ignore());
        // Round trip through the JSON the instance table stores.
        let back: WorkloadSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let e = parse("name: web\ncommand: [x]\ndepends_on: [web]\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("depends_on.web"), "{e}");
        let e = parse("name: web\ncommand: [x]\non_dependency_restart: restart\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("on_dependency_restart"), "{e}");
        assert!(parse("name: web\ncommand: [x]\non_dependency_restart: sometimes\n").is_err());
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let s = parse("name: web\ncommand: [./server, --port, \"${PORT}\"]\n").unwrap();
        assert_eq!(s.driver, DriverKind::Process);
        assert_eq!(s.isolation, Isolation::Namespace);
        assert_eq!(s.shutdown, Shutdown::default());
        assert!(s.readiness.is_none());
        assert!(!s.autostart);
    }

    #[test]
    fn full_manifest() {
        let s = parse(
            r#"
name: web
description: a web service
command: ["python3", "server.py"]
env: {GREETING: hi, WORKERS: 4, DEBUG: true}
driver: process
isolation: session
readiness:
  notify: true
  http: {path: /healthz, period: 50ms, success_threshold: 2}
  tcp: {port: 9000}
  exec: [./check.sh, --quick]
  timeout: 5s
shutdown: {signal: SIGINT, grace: 2s}
restart:
  policy: on-failure
  backoff: {initial: 200ms, max: 10s, factor: 3, jitter: 0.1}
  max_failures: 4
  cooldown: 1m
"#,
        )
        .unwrap();
        assert_eq!(s.env["WORKERS"], "4");
        assert_eq!(s.env["DEBUG"], "true");
        let r = s.readiness.unwrap();
        assert!(r.notify);
        assert_eq!(r.timeout, Duration::from_secs(5));
        let h = r.http.unwrap();
        assert_eq!(h.period, Duration::from_millis(50));
        assert_eq!(h.success_threshold, 2);
        assert_eq!(r.tcp.unwrap().port, Some(9000));
        assert_eq!(r.exec.unwrap().command, vec!["./check.sh", "--quick"]);
        assert_eq!(s.shutdown.signal, Signal::INT);
        assert_eq!(s.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(s.restart.cooldown, Duration::from_secs(60));
    }

    #[test]
    fn liveness_and_idle_timeout() {
        let s = parse("name: web\ncommand: [x]\nliveness: {tcp: {period: 1s, failure_threshold: 2}}\nidle_timeout: 5m\n").unwrap();
        assert_eq!(s.liveness.unwrap().tcp.unwrap().failure_threshold, 2);
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(300)));
        let e = error_of("name: web\ncommand: [x]\nliveness: {}\n");
        assert!(e.contains("field `liveness`"), "{e}");
        let e = error_of("name: web\ncommand: [x]\nidle_timeout: 0s\n");
        assert!(e.contains("field `idle_timeout`"), "{e}");
    }

    #[test]
    fn exec_probe_long_form() {
        let s = parse(
            "name: web\ncommand: [x]\nreadiness:\n  exec: {command: [./check], period: 1s}\n",
        )
        .unwrap();
        let e = s.readiness.unwrap().exec.unwrap();
        assert_eq!(e.command, vec!["./check"]);
        assert_eq!(e.timing.period, Duration::from_secs(1));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = error_of("name: web\ncommand: [x]\nbogus: 1\n");
        assert!(e.starts_with("w/web/manifest.yaml: "), "{e}");
        assert!(e.contains("bogus"), "{e}");

        let e = error_of("name: web\ncommand: []\n");
        assert_eq!(
            e,
            "w/web/manifest.yaml: field `command`: must name a program (an argv list, not empty)"
        );

        let e = error_of("name: other\ncommand: [x]\n");
        assert!(e.contains("field `name`") && e.contains("folder"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nshutdown: {grace: -1s}\n");
        assert!(e.contains("must not be negative"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nshutdown: {signal: SIGBOGUS}\n");
        assert!(e.contains("unknown signal"), "{e}");

        let e = error_of("name: web\ncommand: [x]\ndriver: vm\n");
        assert!(e.contains("vm"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nenv: {PORT: 1}\n");
        assert!(e.contains("field `env.PORT`"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nreadiness: {}\n");
        assert!(e.contains("field `readiness`"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nreadiness: {http: {path: healthz}}\n");
        assert!(e.contains("field `readiness.http.path`"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nreadiness: {tcp: {period: 0s}}\n");
        assert!(e.contains("field `readiness.tcp.period`"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nreadiness: {tcp: {port: 70000}}\n");
        assert!(e.contains("70000"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nisolation: session\nautostart: true\n");
        assert!(e.contains("field `autostart`"), "{e}");

        let e = error_of("name: web\ncommand: [x]\nrestart: {backoff: {factor: 0.5}}\n");
        assert!(e.contains("restart.backoff.factor"), "{e}");

        let e = error_of(": : :\n  - [");
        assert!(e.starts_with("w/web/manifest.yaml: "), "{e}");
    }

    #[test]
    fn hostile_manifests_are_rejected_not_panicked_on() {
        let big = format!(
            "name: web\ncommand: [x]\ndescription: {}\n",
            "a".repeat(MAX_MANIFEST_BYTES)
        );
        assert!(error_of(&big).contains("limit"));
        let bomb = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n";
        assert!(parse(bomb).is_err());
        assert!(parse("name: \"a\\0b\"\ncommand: [x]\n").is_err());
        assert!(parse("name: web\ncommand: [\"a\\0b\"]\n").is_err());
    }

    /// Issue 11: YAML tags were silently ignored (`!custom`) or decoded (`!!binary` turned
    /// base64 into a command), so a manifest could run something else than it reads.
    #[test]
    fn yaml_tags_were_silently_ignored() {
        // The control: without the scan, serde-saphyr takes these.
        let raw: WorkloadSpec =
            serde_saphyr::from_str("name: web\ncommand: [!!binary L2Jpbi90cnVl]\n").unwrap();
        assert_eq!(raw.command, ["/bin/true"], "!!binary is decoded");
        let raw: WorkloadSpec =
            serde_saphyr::from_str("name: web\ncommand: [x]\nenv: {A: !custom x}\n").unwrap();
        assert_eq!(raw.env["A"], "x", "!custom is ignored");
        let cases = [
            (
                "name: web\ncommand: [!!binary L2Jpbi90cnVl]\n",
                Some("command[0]"),
                "!!binary",
                2,
            ),
            (
                "name: web\ncommand: !!binary L2Jpbi90cnVl\n",
                Some("command"),
                "!!binary",
                2,
            ),
            (
                "name: web\ncommand: [x]\nenv: {A: !custom x}\n",
                Some("env.A"),
                "!custom",
                3,
            ),
            (
                "name: web\ncommand: [x]\nenv:\n  A: ok\n  B: !custom x\n",
                Some("env.B"),
                "!custom",
                5,
            ),
            ("name: !!str web\ncommand: [x]\n", Some("name"), "!!str", 1),
            ("!!str name: web\ncommand: [x]\n", Some("name"), "!!str", 1),
            (
                "name: web\ncommand: [a, b, !x c]\n",
                Some("command[2]"),
                "!x",
                2,
            ),
            (
                "name: web\ncommand: !!seq [x]\n",
                Some("command"),
                "!!seq",
                2,
            ),
            (
                "name: web\ncommand: [x]\nshutdown: !<tag:x> {grace: 1s}\n",
                Some("shutdown"),
                "!<",
                3,
            ),
            ("--- !doc\nname: web\ncommand: [x]\n", None, "!doc", 1),
            (
                "name: web\ncommand: &a [x]\nx-alias: *a\nenv: {A: !t y}\n",
                Some("env.A"),
                "!t",
                4,
            ),
        ];
        for (text, field, tag, line) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.kind, ManifestErrorKind::Tag, "{text:?}: {e}");
            assert_eq!(e.field.as_deref(), field, "{text:?}: {e}");
            assert_eq!(e.position.map(|p| p.0), Some(line), "{text:?}: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with("w/web/manifest.yaml: ")
                    && msg.contains(tag)
                    && msg.contains("not allowed"),
                "{msg}"
            );
        }
        // A quoted string that looks like a tag is a string.
        let s =
            parse("name: web\ncommand: ['!!binary', \"!x\"]\ndescription: '!custom'\n").unwrap();
        assert_eq!(s.command, ["!!binary", "!x"]);
    }

    /// Issue 11: errors quoted the manifest (a source snippet, values) to anyone who could
    /// list workloads. `redacted` names the file, the field or line and a generic reason.
    #[test]
    fn manifest_errors_quoted_the_file_to_anyone() {
        let cases = [
            // serde-saphyr: a type error, with its snippet of the source.
            "name: web\ncommand: [x]\nenv: {TOKEN: s3cret-value}\nshutdown: {grace: s3cret-grace}\n",
            // An unknown field.
            "name: web\ncommand: [x]\nenv: {TOKEN: s3cret-value}\ns3cret-field: 1\n",
            // Not YAML.
            "name: web\ncommand: [x]\nenv: {TOKEN: s3cret-value\n",
            // Validation: the folder mismatch quotes the name.
            "name: s3cret\ncommand: [x]\n",
            // A tag.
            "name: web\ncommand: [x]\nenv: {TOKEN: !s3cret value}\n",
        ];
        for text in cases {
            let e = parse(text).unwrap_err();
            assert!(
                e.to_string().contains("s3cret"),
                "the control: the full error quotes it: {e}"
            );
            let r = e.redacted();
            assert!(!r.contains("s3cret"), "{r}");
            assert!(r.starts_with("w/web/manifest.yaml: "), "{r}");
            assert!(r.contains(e.kind.generic_reason()), "{r}");
            assert!(
                e.field.is_some() || e.position.is_some(),
                "names where: {r}"
            );
        }
    }
}
