//! Command-line definitions (what the user typed; validated later).

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// The help heading of the connection flags (`--socket`, `--tcp`, `--tls-*`, `--token`).
pub const CONNECTION: &str = "Connection";

/// An on-demand, isolating process launcher and supervisor.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version)]
pub struct Cli {
    /// The daemon's API socket. Default: ./.bulkhead/bulkhead.sock when there is one (a
    /// `bulkhead up` in this directory), else the default configuration file's `socket`,
    /// else /run/bulkhead/bulkhead.sock as root, $XDG_RUNTIME_DIR/bulkhead/bulkhead.sock
    /// otherwise.
    #[arg(
        long,
        global = true,
        env = "BULKHEAD_SOCKET",
        value_name = "PATH",
        help_heading = CONNECTION
    )]
    pub socket: Option<PathBuf>,

    #[command(flatten)]
    pub remote: RemoteArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// The connection flags each verb shows in its help; the others are hidden there (still
/// accepted, as everywhere) and listed once, under "Connection", in `bulkhead --help`.
fn connection_flags_shown(verb: &str) -> &'static [&'static str] {
    match verb {
        // The daemon listens on --socket; --tls-cert and --tls-key serve `--listen`.
        "serve" => &["socket", "tls_cert", "tls_key"],
        "up" => &["socket"],
        _ => &[],
    }
}

/// Verbs that talk to no daemon: their help does not point at the connection flags.
const OFFLINE: [&str; 5] = ["serve", "up", "keeper", "completions", "man"];

/// The command line as the user sees it (help, man pages): [`Cli`] with the connection
/// flags shown once, at the top, and in each verb only where it uses them.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let connection: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.get_help_heading() == Some(CONNECTION))
        .cloned()
        .collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let pointer = "Connection flags (--socket, --tcp, --tls-ca, --tls-cert, --tls-key, --token): \
                   see `bulkhead --help` or bulkhead(1).";
    for name in names {
        let shown = connection_flags_shown(&name);
        let offline = OFFLINE.contains(&name.as_str());
        cmd = cmd.mut_subcommand(&name, |mut sc| {
            // A global flag is copied into a verb only when the verb has no flag of that
            // id: a hidden copy here keeps the flag working but out of the verb's help.
            for a in &connection {
                if !shown.contains(&a.get_id().as_str()) {
                    sc = sc.arg(a.clone().hide(true));
                }
            }
            if offline {
                return sc;
            }
            let subs: Vec<String> = sc
                .get_subcommands()
                .map(|c| c.get_name().to_owned())
                .collect();
            for sub in subs {
                sc = sc.mut_subcommand(&sub, |c| c.after_help(pointer));
            }
            sc.after_help(pointer)
        });
    }
    cmd
}

/// Reaching a daemon over TCP (instead of the socket), and the TLS files of `serve
/// --listen`.
#[derive(Debug, Args, Clone, Default)]
pub struct RemoteArgs {
    /// Talk to a remote daemon's TCP listener (HOST:PORT, mutual TLS) instead of the socket.
    #[arg(long, global = true, value_name = "ADDR", help_heading = CONNECTION)]
    pub tcp: Option<String>,
    /// With --tcp: the CA that signed the daemon's certificate (PEM).
    #[arg(long, global = true, value_name = "PATH", help_heading = CONNECTION)]
    pub tls_ca: Option<PathBuf>,
    /// This side's certificate (PEM): the client's with --tcp, the server's with `serve
    /// --listen`.
    #[arg(long, global = true, value_name = "PATH", help_heading = CONNECTION)]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "PATH", help_heading = CONNECTION)]
    pub tls_key: Option<PathBuf>,
    /// With --tcp: the bearer token sent with every request.
    #[arg(
        long,
        global = true,
        env = "BULKHEAD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = CONNECTION
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon and launch the autostart workloads (settings: flags over --config).
    Serve(Box<ServeArgs>),
    /// The keeper process that parents the instances (started by the daemon).
    #[command(hide = true)]
    Keeper(KeeperArgs),
    /// Serve a workloads directory in the foreground, launch its autostart workloads and
    /// print events; Ctrl-C tears everything down.
    Up(Box<UpArgs>),
    /// Launch a workload (or reuse the running instance of its key).
    Launch(LaunchArgs),
    /// Show one instance.
    Get(GetArgs),
    /// List instances.
    #[command(visible_aliases = ["ls", "ps"])]
    List(ListArgs),
    /// Stop an instance: its shutdown signal to every process, SIGKILL after the grace.
    ///
    /// The instance stays listed as `terminated` until it ages out (`serve
    /// --finished-kept`).
    #[command(visible_aliases = ["stop", "rm"])]
    Terminate(TerminateArgs),
    /// Restart an instance gracefully: same key, same address, a new run at once
    /// (returns when it is ready). `--new-spec`: onto the reloaded manifest.
    Restart(RestartArgs),
    /// Move a workload's live instances onto its reloaded manifest, one at a time; stops
    /// at the first failure and rolls that instance back.
    Rollout(RolloutArgs),
    /// Every instance live in the terminal: state, usage, details, logs and events;
    /// terminate, restart, launch and end sessions from there (`?` lists the keys).
    Top(TopArgs),
    /// Print lifecycle events.
    Events(EventsArgs),
    /// Print an instance's stdout and stderr.
    Logs(LogsArgs),
    /// Show the daemon's health.
    Health(OutputArgs),
    /// List workloads, valid and invalid.
    Workloads(WorkloadsArgs),
    /// Rescan the workloads directory.
    Reload,
    /// Drop HOLDER's lease on an instance.
    Release(ReleaseArgs),
    /// Terminate every instance of a session.
    EndSession(EndScopeArgs),
    /// Terminate every instance of a namespace.
    EndNamespace(EndScopeArgs),
    /// Run a command in a running instance's environment and working directory; exits
    /// with the command's exit code (128+N if killed by signal N).
    Exec(ExecArgs),
    /// List the docker driver's cached images (`images prune`: remove the unused ones).
    Images(ImagesArgs),
    /// Send to or receive from an instance's data-plane channel (shared memory).
    #[command(subcommand)]
    Pipe(PipeCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Write the man pages (bulkhead.1 and one per verb), or print bulkhead.1.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write every page (bulkhead.1, bulkhead-<verb>.1, ...) into this directory instead
    /// of printing bulkhead.1 on stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The states an instance can be in (`list --state`).
pub const STATES: [&str; 8] = [
    "starting",
    "ready",
    "stopping",
    "restarting",
    "exited",
    "crashed",
    "failed",
    "terminated",
];

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only instances of this workload (repeat, or separate with commas, for several).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub workload: Vec<String>,
    /// Only instances in this state (repeat, or separate with commas, for several).
    #[arg(long, value_name = "STATE", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(STATES))]
    pub state: Vec<String>,
    /// Only instances of this namespace (`ns:<NAMESPACE>:...`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only instances of this session (`session:<SESSION>:...`).
    #[arg(long)]
    pub session: Option<String>,
    /// Output format: a table, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    #[command(subcommand)]
    pub action: Option<ImagesAction>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value_t,
        global = true
    )]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum ImagesAction {
    /// Remove every cached image that no container uses.
    Prune,
}

#[derive(Debug, Subcommand)]
pub enum PipeCommand {
    /// Publish stdin on an input channel: one message per line (default) or all of it as
    /// one message (--whole).
    Send(PipeSendArgs),
    /// Print messages from an output channel, one per line (--raw: bytes as they are).
    Recv(PipeRecvArgs),
}

#[derive(Debug, Args)]
pub struct PipeSendArgs {
    /// The instance (e.g. session:s1:echo-rust).
    pub id: String,
    /// One of its input channels.
    pub channel: String,
    /// Send all of stdin as one message.
    #[arg(long)]
    pub whole: bool,
    /// Keep the channel open this long after sending: a message lives in the sender's
    /// shared memory, so it must outlast the receiver's read.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub linger: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct PipeRecvArgs {
    /// The instance (e.g. session:s1:echo-rust).
    pub id: String,
    /// One of its output channels.
    pub channel: String,
    /// How many messages to print before exiting.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Give up (exit code 6) when a message takes longer than this.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Write the bytes of each message as they are, without a newline after each.
    #[arg(long)]
    pub raw: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    bulkhead_core::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Readable: a table or one line per item, sizes and durations in human units.
    #[default]
    Text,
    /// JSON for scripts: exact numbers (bytes, milliseconds, signal numbers).
    Json,
}

#[derive(Debug, Args)]
pub struct WorkloadsArgs {
    /// Print the dependency graph (depends_on) as an indented tree.
    #[arg(long, conflicts_with = "output")]
    pub graph: bool,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// The settings of `serve` (and `up`). Every one can also be set in the configuration
/// file (`--config`; the key is the flag's name without `--`, see `dist/config.toml`): a
/// flag (or its environment variable) overrides the file, the file overrides the default.
/// `None` here means "not given on the command line"; `config::resolve` applies the rest.
#[derive(Debug, Args, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// The configuration file (TOML). Default for `serve`: /etc/bulkhead/config.toml as
    /// root, $XDG_CONFIG_HOME/bulkhead/config.toml otherwise (a missing default file is
    /// fine); `up` reads one only when given.
    #[arg(long, value_name = "PATH", env = "BULKHEAD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The workloads directory: <dir>/<name>/manifest.yaml. Default: /etc/bulkhead/workloads
    /// as root, $XDG_CONFIG_HOME/bulkhead/workloads otherwise.
    #[arg(long, value_name = "DIR")]
    pub workloads: Option<PathBuf>,
    /// State directory (database, logs, notify sockets, lock). Default: /var/lib/bulkhead
    /// as root, $XDG_STATE_HOME/bulkhead otherwise (`up`: ./.bulkhead).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The API socket: the global --socket (config key `socket`).
    #[arg(skip)]
    pub socket: Option<PathBuf>,
    /// Log size in bytes at which an instance log rotates [default: 8Mi].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub log_max_bytes: Option<u64>,
    /// Events kept in the state database (<state>/bulkhead.db); older ones are deleted
    /// [default: 100000].
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    #[serde(default, deserialize_with = "de::at_least_one")]
    pub event_retention: Option<usize>,
    /// How hard an event commit goes to the disk: `normal` survives any daemon crash;
    /// `full` also survives a power loss (an fsync per commit, ~1 ms more per launch here)
    /// [default: normal].
    #[arg(long, value_enum)]
    pub event_sync: Option<EventSync>,
    /// Serve Prometheus metrics (/metrics), /health and /ready over HTTP on this address,
    /// e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// With --metrics: /metrics, /health and /ready need `Authorization: Bearer <token>`
    /// with a token of this file (the --tokens format; it may be the same file). Needed
    /// when ADDR is not loopback, unless --metrics-insecure.
    #[arg(long, value_name = "PATH")]
    pub metrics_tokens: Option<PathBuf>,
    /// With --metrics on an address that is not loopback: serve it without tokens.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub metrics_insecure: Option<bool>,
    /// Also serve the API on this TCP address (e.g. 0.0.0.0:7443), with mutual TLS and
    /// tokens: needs --tls-cert, --tls-key, --client-ca and --tokens.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// With --listen: the CA whose certificates clients must present (PEM).
    #[arg(long, value_name = "PATH")]
    pub client_ca: Option<PathBuf>,
    /// With --listen: the token file (YAML, or TOML if it ends in .toml).
    #[arg(long, value_name = "PATH")]
    pub tokens: Option<PathBuf>,
    /// The server certificate and key of --listen: the global --tls-cert and --tls-key
    /// (config keys `tls-cert`, `tls-key`).
    #[arg(skip)]
    pub tls_cert: Option<PathBuf>,
    #[arg(skip)]
    pub tls_key: Option<PathBuf>,
    /// Be the instances' parent instead of spawning them through the keeper: instances
    /// then cannot be adopted after a daemon crash.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub no_keeper: Option<bool>,
    /// Keep no spare slot in the keeper: every launch of a process workload without
    /// `warm:` then waits for the keeper's clone and its cgroup's creation (see the
    /// README, "The spare").
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub no_process_spare: Option<bool>,
    /// When the state database is empty, damaged or from a newer bulkhead, move it aside
    /// (<state>/bulkhead.db.bad-<unix seconds>, with its -wal and -shm) and start a new
    /// one instead of refusing to start. Event ids go on after the newest one the old
    /// file still shows. A sound database is left alone.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub fresh_state: Option<bool>,
    /// A sandbox launch fails at once when the machine's available memory (MemAvailable)
    /// is below this size (`0`: never), rather than push it into the OOM killer
    /// [default: 64Mi].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub min_available_memory: Option<u64>,
    /// At most N live instances; a launch that would create one more is refused (exit 9,
    /// RESOURCE_EXHAUSTED). Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_instances: Option<usize>,
    /// At most N live instances in one namespace (instances `ns:<namespace>:…`; session
    /// and shared instances are in no namespace); a launch that would create one more
    /// there is refused (exit 9, RESOURCE_EXHAUSTED). Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_instances_per_namespace: Option<usize>,
    /// How many finished instances stay listed (get, list, logs), with their log files,
    /// before the oldest are forgotten. A key launched again replaces its finished one
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub finished_kept: Option<usize>,
    /// How long a finished instance stays listed, with its log files, before it is
    /// forgotten (e.g. 1h, 7d) [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub finished_ttl: Option<std::time::Duration>,
    /// The TCP ports handed to instances as $PORT: LOW-HIGH (or one port). A launch fails
    /// only when every port of the range is held by a live instance or in use
    /// [default: 20000-32000].
    #[arg(long, value_name = "LOW-HIGH")]
    #[serde(default, deserialize_with = "de::from_str")]
    pub port_range: Option<bulkhead_core::port::PortRange>,
    /// Do not start the sandbox driver.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub no_sandbox: Option<bool>,
    /// Remount the cgroup2 mount with `favordynmods`: moving a process between cgroups
    /// (the sandbox's v1 attach) then skips an RCU grace period. System-wide.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_name = "BOOL")]
    pub cgroup_favordynmods: Option<bool>,
    /// The docker driver's image cache keeps at most this many built images (least
    /// recently used evicted first; images in use are never evicted).
    #[arg(long, value_name = "N")]
    pub image_cache_max_count: Option<usize>,
    /// ... and at most this many bytes of them (e.g. 10Gi).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub image_cache_max_bytes: Option<u64>,
    /// What the warm slots of every `warm:` workload may hold together (e.g. 512Mi;
    /// 0 keeps no slot) [default: 256Mi].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub warm_memory: Option<u64>,
    /// The Docker Swarm manager that `driver: swarm` workloads run on
    /// (`unix:///path` or `tcp://host:port`); without it the swarm driver is not
    /// available.
    #[arg(long, value_name = "URL", env = "BULKHEAD_SWARM_HOST")]
    pub swarm_host: Option<String>,
    /// The kubernetes driver's kubeconfig [default: in-cluster config, else KUBECONFIG,
    /// else ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context the kubernetes driver uses [default: its current one].
    #[arg(long, value_name = "NAME")]
    pub kubernetes_context: Option<String>,
    /// The namespace of Pods whose manifest names none [default: the kubeconfig's].
    #[arg(long, value_name = "NS")]
    pub kubernetes_namespace: Option<String>,
    /// The daemon's own log on stderr: text (coloured only on a terminal, and never when
    /// NO_COLOR is set) or JSON, one object per line [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// A line per event: time, level, message, fields.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields, span).
    Json,
}

/// Deserializers of the configuration file's values that the flags parse from text.
mod de {
    use serde::{Deserialize, Deserializer};

    /// A size: a number of bytes, or text like `64Mi`.
    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Size {
            Bytes(u64),
            Text(String),
        }
        match Size::deserialize(d)? {
            Size::Bytes(n) => Ok(Some(n)),
            Size::Text(t) => super::parse_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }

    /// A duration written as text (`24h`, `90s`).
    pub fn duration<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let t = String::deserialize(d)?;
        super::parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }

    /// A count that must be at least 1.
    pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        match usize::deserialize(d)? {
            0 => Err(serde::de::Error::custom("must be at least 1")),
            n => Ok(Some(n)),
        }
    }

    /// A value written as text, parsed like its flag.
    pub fn from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let t = String::deserialize(d)?;
        t.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    bulkhead_core::size::parse(s).map_err(|e| e.to_string())
}

/// Arguments of the internal `keeper` command (started by the daemon).
#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// The state directory of the daemon that started this keeper.
    #[arg(long)]
    pub state: PathBuf,
    /// Which of the state directory's keepers this is (0 first; the daemon starts the
    /// next when every keeper is full).
    #[arg(long, default_value_t = 0)]
    pub shard: usize,
}

/// `up`: `serve` in the foreground, with the local demo defaults and events printed.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The workloads directory (the same as --workloads; default: ./examples/workloads).
    #[arg(value_name = "DIR", conflicts_with = "workloads")]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Wait {
    /// Return as soon as the daemon has accepted the launch.
    None,
    /// Wait until the main process has started.
    Started,
    /// Wait until the instance is ready (its readiness check passed).
    Ready,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// The workload to launch (a name from `bulkhead workloads`).
    pub workload: String,
    /// The namespace of an `isolation: namespace` workload (default: `default`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// The session of an `isolation: session` workload.
    #[arg(long)]
    pub session: Option<String>,
    /// What to wait for before returning.
    #[arg(long, value_enum, default_value = "ready")]
    pub wait: Wait,
    /// Give up waiting after this long (e.g. 5s, 500ms); the instance goes on starting.
    #[arg(long, allow_hyphen_values = true)]
    pub timeout: Option<String>,
    /// Take a lease for HOLDER: the instance stays while any lease holds it.
    #[arg(long, value_name = "HOLDER")]
    pub lease: Option<String>,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The instance (e.g. ns:default:web, session:s1:worker, shared:db).
    pub id: String,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// The instance (e.g. ns:default:web, session:s1:worker, shared:db).
    pub id: String,
    /// Override the manifest's grace period (e.g. 2s).
    #[arg(long, allow_hyphen_values = true)]
    pub grace: Option<String>,
    /// Then stop its dependencies (depends_on), dependents first, except those another
    /// live instance still depends on.
    #[arg(long)]
    pub with_dependencies: bool,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often the CPU and memory of the rows on screen are read (e.g. 2s).
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// Print one frame as text and exit (for scripts), at --width x --height.
    #[arg(long)]
    pub once: bool,
    /// The frame's width with --once.
    #[arg(long, default_value_t = 120, requires = "once")]
    pub width: u16,
    /// The frame's height with --once.
    #[arg(long, default_value_t = 40, requires = "once")]
    pub height: u16,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The instance (e.g. ns:default:web, session:s1:worker, shared:db).
    pub id: String,
    /// Override the manifest's grace period for stopping the current run (e.g. 2s).
    #[arg(long, allow_hyphen_values = true)]
    pub grace: Option<String>,
    /// Start the new run on the workload's current (reloaded) manifest; if it fails, the
    /// instance goes back to the manifest it ran.
    #[arg(long)]
    pub new_spec: bool,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The workload whose instances move onto its manifest as now loaded.
    pub workload: String,
    /// Override the manifest's grace period for stopping each old run (e.g. 2s).
    #[arg(long, allow_hyphen_values = true)]
    pub grace: Option<String>,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep streaming new events.
    #[arg(short, long)]
    pub follow: bool,
    /// Only events with an id greater than N.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The instance id (`session:s1:web`), live or finished.
    pub id: String,
    /// Keep streaming new output.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines (0: all).
    #[arg(short = 'n', long, default_value_t = 0, value_name = "N")]
    pub tail: u64,
    /// Only lines written since this long ago (`10m`, `2h`) or this time (RFC 3339).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Prefix each line with the time it was written (and its stream).
    #[arg(short, long)]
    pub timestamps: bool,
    /// Output format: text (stdout lines on stdout, stderr lines and run marks on
    /// stderr) or json (one object per line: time, stream, run, line, partial).
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The instance (e.g. session:s1:worker).
    pub id: String,
    /// The holder whose lease to drop (the HOLDER of `launch --lease`).
    pub holder: String,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct EndScopeArgs {
    /// The session or namespace name.
    pub name: String,
    /// Override each instance's grace period (e.g. 2s).
    #[arg(long, allow_hyphen_values = true)]
    pub grace: Option<String>,
    /// Output format: text, or JSON with exact numbers.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The instance (e.g. ns:default:web).
    pub id: String,
    /// Run the command on a pseudo-terminal (for interactive programs); this terminal is
    /// put in raw mode meanwhile and its size follows.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSync {
    Normal,
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    /// Every argument of `cmd` and of its subcommands (hidden ones too) without help text,
    /// as `verb arg` paths.
    fn without_help(cmd: &clap::Command) -> Vec<String> {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let help = a.get_help().or(a.get_long_help()).map(|h| h.to_string());
                if help.is_none_or(|h| h.trim().is_empty()) {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            if cmd.get_about().is_none() && path != "bulkhead help" {
                missing.push(format!("{path} (about)"));
            }
            for sc in cmd.get_subcommands() {
                walk(sc, &format!("{path} {}", sc.get_name()), missing);
            }
        }
        let mut cmd = cmd.clone();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, cmd.get_name(), &mut missing);
        missing
    }

    /// Issue 14: positional arguments, --namespace, --session and -o had no help text.
    #[test]
    fn every_argument_of_every_verb_has_help() {
        let missing = without_help(&command());
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    /// The walker of the test above finds an argument without help (else it proves nothing).
    #[test]
    fn the_help_walker_finds_a_bare_argument() {
        let cmd = clap::Command::new("t").about("t").subcommand(
            clap::Command::new("v")
                .about("v")
                .arg(clap::Arg::new("bare").long("bare")),
        );
        assert_eq!(without_help(&cmd), ["t v bare"]);
    }

    fn help_of(path: &[&str]) -> String {
        let mut cmd = command();
        cmd.build();
        let mut c = &mut cmd;
        for p in path {
            c = c.find_subcommand_mut(p).unwrap();
        }
        c.render_long_help().to_string()
    }

    const CLIENT_ONLY: [&str; 3] = ["--tcp", "--tls-ca", "--token"];
    const ALL: [&str; 6] = [
        "--socket",
        "--tcp",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--token",
    ];

    /// Issue 14: six connection flags repeated, unsorted, in every verb's help, and `serve
    /// --help` listed client-only flags.
    #[test]
    fn connection_flags_are_shown_once_under_their_heading() {
        let top = help_of(&[]);
        let (_, conn) = top.split_once("Connection:").expect("a Connection heading");
        for f in ALL {
            assert!(conn.contains(f), "{f} under Connection in:\n{top}");
        }
        for verb in [
            &["list"][..],
            &["launch"],
            &["get"],
            &["terminate"],
            &["pipe", "send"],
            &["images"],
        ] {
            let h = help_of(verb);
            for f in ALL {
                assert!(!h.contains(&format!("{f} <")), "{verb:?} lists {f}:\n{h}");
            }
            assert!(h.contains("see `bulkhead --help`"), "{verb:?}:\n{h}");
        }
        let serve = help_of(&["serve"]);
        // A flag is listed as `--flag <VALUE>` (help texts may mention it by name).
        for f in CLIENT_ONLY {
            assert!(
                !serve.contains(&format!("{f} <")),
                "serve lists {f}:\n{serve}"
            );
        }
        for f in ["--socket", "--tls-cert", "--tls-key"] {
            assert!(
                serve.contains(&format!("{f} <")),
                "serve lacks {f}:\n{serve}"
            );
        }
        let up = help_of(&["up"]);
        assert!(up.contains("--socket <") && !up.contains("--tcp <"), "{up}");
    }

    fn parse(argv: &[&str]) -> Cli {
        let m = command()
            .try_get_matches_from(std::iter::once("bulkhead").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        Cli::from_arg_matches(&m).unwrap()
    }

    /// Hidden from a verb's help, a connection flag still works after the verb.
    #[test]
    fn connection_flags_still_parse_after_any_verb() {
        for argv in [
            &["list", "--socket", "/x.sock"][..],
            &["--socket", "/x.sock", "list"],
            &["pipe", "send", "--socket", "/x.sock", "session:s:w", "in"],
            &["serve", "--workloads", "w", "--socket", "/x.sock"],
        ] {
            assert_eq!(
                parse(argv).socket,
                Some(PathBuf::from("/x.sock")),
                "{argv:?}"
            );
        }
        let c = parse(&["get", "shared:w", "--tcp", "h:1", "--token", "t"]);
        assert_eq!(c.remote.tcp.as_deref(), Some("h:1"));
        assert_eq!(c.remote.token.as_deref(), Some("t"));
    }

    #[test]
    fn short_aliases() {
        for v in ["list", "ls", "ps"] {
            assert!(matches!(parse(&[v]).command, Command::List(_)), "{v}");
        }
        for v in ["terminate", "stop", "rm"] {
            assert!(
                matches!(parse(&[v, "shared:w"]).command, Command::Terminate(_)),
                "{v}"
            );
        }
    }
}
