//! Where things are, and the settings of `serve`: flags (and their environment variables)
//! over the configuration file over the defaults.
//!
//! Default locations follow the platform:
//!
//! | | root | anyone else |
//! |---|---|---|
//! | configuration | `/etc/bulkhead/config.toml` | `$XDG_CONFIG_HOME/bulkhead/config.toml` |
//! | workloads | `/etc/bulkhead/workloads` | `$XDG_CONFIG_HOME/bulkhead/workloads` |
//! | state | `/var/lib/bulkhead` | `$XDG_STATE_HOME/bulkhead` |
//! | API socket | `/run/bulkhead/bulkhead.sock` | `$XDG_RUNTIME_DIR/bulkhead/bulkhead.sock` |
//!
//! `$XDG_CONFIG_HOME` defaults to `~/.config`, `$XDG_STATE_HOME` to `~/.local/state`; a
//! relative value is ignored (the XDG rule). Without `$XDG_RUNTIME_DIR` the socket is
//! `<state>/bulkhead.sock`. The client looks for the socket the same way, after
//! `./.bulkhead/bulkhead.sock` (a `bulkhead up` in the current directory).

use std::path::{Path, PathBuf};

use crate::cli::ServeArgs;

/// What the default locations depend on (injected in tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub uid: u32,
    pub home: Option<PathBuf>,
    pub xdg_config_home: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
}

impl Env {
    /// This process's user and environment.
    pub fn current() -> Env {
        // Only absolute values count (XDG base directory specification).
        let var = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        Env {
            uid: rustix::process::geteuid().as_raw(),
            home: var("HOME"),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            xdg_state_home: var("XDG_STATE_HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
        }
    }
}

/// The default locations for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config: PathBuf,
    pub workloads: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
}

/// A non-root user with neither `$HOME` nor the XDG variables has no default location.
#[derive(Debug, thiserror::Error)]
#[error("no default location for {what}: set ${var} or $HOME (or give {flag})")]
pub struct NoDefault {
    what: &'static str,
    var: &'static str,
    flag: &'static str,
}

impl Paths {
    /// The defaults of the user `env` describes (see the module docs).
    pub fn for_env(env: &Env) -> Result<Paths, NoDefault> {
        if env.uid == 0 {
            return Ok(Paths {
                config: "/etc/bulkhead/config.toml".into(),
                workloads: "/etc/bulkhead/workloads".into(),
                state: "/var/lib/bulkhead".into(),
                socket: "/run/bulkhead/bulkhead.sock".into(),
            });
        }
        let under_home = |xdg: &Option<PathBuf>, rel: &str, what, var, flag| {
            xdg.clone()
                .or_else(|| env.home.as_ref().map(|h| h.join(rel)))
                .map(|p| p.join("bulkhead"))
                .ok_or(NoDefault { what, var, flag })
        };
        let config_dir = under_home(
            &env.xdg_config_home,
            ".config",
            "the configuration",
            "XDG_CONFIG_HOME",
            "--config",
        )?;
        let state = under_home(
            &env.xdg_state_home,
            ".local/state",
            "the state directory",
            "XDG_STATE_HOME",
            "--state",
        )?;
        let socket = match &env.xdg_runtime_dir {
            Some(run) => run.join("bulkhead/bulkhead.sock"),
            None => state.join("bulkhead.sock"),
        };
        Ok(Paths {
            config: config_dir.join("config.toml"),
            workloads: config_dir.join("workloads"),
            state,
            socket,
        })
    }
}

/// The socket of `bulkhead up`'s local demo directory.
pub const LOCAL_SOCKET: &str = ".bulkhead/bulkhead.sock";

/// The socket a client talks to when neither `--socket` nor `$BULKHEAD_SOCKET` is given:
/// `./.bulkhead/bulkhead.sock` if it is a socket (a `bulkhead up` here), else the `socket`
/// of the default configuration file (the one `serve` reads), else the platform default.
/// A configuration file that cannot be read is the daemon's to report: it is skipped here.
pub fn client_socket(env: &Env, cwd: &Path) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let local = cwd.join(LOCAL_SOCKET);
    if std::fs::metadata(&local).is_ok_and(|m| m.file_type().is_socket()) {
        return PathBuf::from(LOCAL_SOCKET);
    }
    let Ok(paths) = Paths::for_env(env) else {
        // Nothing better to try; the connection error names this path.
        return PathBuf::from(LOCAL_SOCKET);
    };
    let configured = load(&paths.config).ok().and_then(|s| {
        let dir = paths.config.parent()?;
        s.relative_to(dir).socket
    });
    configured.unwrap_or(paths.socket)
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Names the file, the line and column, and the key.
    #[error("{path}:{line}:{column}: {key}{message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        /// "key `name`: ", or empty when the error is not about one key.
        key: String,
        message: String,
    },
}

/// Reads the settings of a configuration file.
pub fn load(path: &Path) -> Result<ServeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses a configuration file's text (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<ServeArgs, ConfigError> {
    toml::from_str::<ServeArgs>(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start).min(text.len());
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        let line_text = text[line_start..].lines().next().unwrap_or("");
        let key = line_text
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"'))
            .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['))
            .map(|k| format!("key `{k}`: "))
            .unwrap_or_default();
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            column,
            key,
            message: e.message().trim_end().to_owned(),
        }
    })
}

/// Which configuration file applies: `--config` (must exist), else for `serve` the
/// platform default when it exists. `up` reads only an explicit one.
pub fn file_settings(
    explicit: Option<&Path>,
    default: Option<&Path>,
) -> Result<Option<(PathBuf, ServeArgs)>, ConfigError> {
    if let Some(p) = explicit {
        return load(p).map(|s| Some((p.to_owned(), s)));
    }
    match default {
        Some(p) if p.exists() => load(p).map(|s| Some((p.to_owned(), s))),
        _ => Ok(None),
    }
}

impl ServeArgs {
    /// Each setting the command line did not give, from `file`. Every field is listed:
    /// a new setting does not compile until it says how it merges.
    pub fn or_file(self, file: ServeArgs) -> ServeArgs {
        let ServeArgs {
            config,
            workloads,
            state,
            socket,
            log_max_bytes,
            event_retention,
            event_sync,
            metrics,
            metrics_tokens,
            metrics_insecure,
            listen,
            client_ca,
            tokens,
            tls_cert,
            tls_key,
            no_keeper,
            no_process_spare,
            fresh_state,
            min_available_memory,
            max_instances,
            max_instances_per_namespace,
            finished_kept,
            port_range,
            no_sandbox,
            cgroup_favordynmods,
            image_cache_max_count,
            image_cache_max_bytes,
            warm_memory,
            swarm_host,
            kubeconfig,
            kubernetes_context,
            kubernetes_namespace,
            log_format,
            finished_ttl,
        } = self;
        ServeArgs {
            config,
            workloads: workloads.or(file.workloads),
            state: state.or(file.state),
            socket: socket.or(file.socket),
            log_max_bytes: log_max_bytes.or(file.log_max_bytes),
            event_retention: event_retention.or(file.event_retention),
            event_sync: event_sync.or(file.event_sync),
            metrics: metrics.or(file.metrics),
            metrics_tokens: metrics_tokens.or(file.metrics_tokens),
            metrics_insecure: metrics_insecure.or(file.metrics_insecure),
            listen: listen.or(file.listen),
            client_ca: client_ca.or(file.client_ca),
            tokens: tokens.or(file.tokens),
            tls_cert: tls_cert.or(file.tls_cert),
            tls_key: tls_key.or(file.tls_key),
            no_keeper: no_keeper.or(file.no_keeper),
            no_process_spare: no_process_spare.or(file.no_process_spare),
            fresh_state: fresh_state.or(file.fresh_state),
            min_available_memory: min_available_memory.or(file.min_available_memory),
            max_instances: max_instances.or(file.max_instances),
            max_instances_per_namespace: max_instances_per_namespace
                .or(file.max_instances_per_namespace),
            finished_kept: finished_kept.or(file.finished_kept),
            port_range: port_range.or(file.port_range),
            no_sandbox: no_sandbox.or(file.no_sandbox),
            cgroup_favordynmods: cgroup_favordynmods.or(file.cgroup_favordynmods),
            image_cache_max_count: image_cache_max_count.or(file.image_cache_max_count),
            image_cache_max_bytes: image_cache_max_bytes.or(file.image_cache_max_bytes),
            warm_memory: warm_memory.or(file.warm_memory),
            swarm_host: swarm_host.or(file.swarm_host),
            kubeconfig: kubeconfig.or(file.kubeconfig),
            kubernetes_context: kubernetes_context.or(file.kubernetes_context),
            kubernetes_namespace: kubernetes_namespace.or(file.kubernetes_namespace),
            log_format: log_format.or(file.log_format),
            finished_ttl: finished_ttl.or(file.finished_ttl),
        }
    }

    /// Relative paths of a configuration file are relative to the file's directory.
    pub fn relative_to(mut self, dir: &Path) -> ServeArgs {
        for p in [
            &mut self.workloads,
            &mut self.state,
            &mut self.socket,
            &mut self.metrics_tokens,
            &mut self.client_ca,
            &mut self.tokens,
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.kubeconfig,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(home: Option<&str>) -> Env {
        Env {
            uid: 1000,
            home: home.map(PathBuf::from),
            ..Env::default()
        }
    }

    #[test]
    fn root_uses_the_system_locations() {
        // Injected uid 0 even when HOME and XDG are set: root's daemon is the system's.
        let env = Env {
            uid: 0,
            home: Some("/root".into()),
            xdg_runtime_dir: Some("/run/user/0".into()),
            ..Env::default()
        };
        let p = Paths::for_env(&env).unwrap();
        assert_eq!(p.config, Path::new("/etc/bulkhead/config.toml"));
        assert_eq!(p.workloads, Path::new("/etc/bulkhead/workloads"));
        assert_eq!(p.state, Path::new("/var/lib/bulkhead"));
        assert_eq!(p.socket, Path::new("/run/bulkhead/bulkhead.sock"));
    }

    #[test]
    fn a_user_gets_xdg_locations_with_home_fallbacks() {
        let p = Paths::for_env(&user(Some("/home/u"))).unwrap();
        assert_eq!(p.config, Path::new("/home/u/.config/bulkhead/config.toml"));
        assert_eq!(p.workloads, Path::new("/home/u/.config/bulkhead/workloads"));
        assert_eq!(p.state, Path::new("/home/u/.local/state/bulkhead"));
        // No runtime directory: the socket lives in the state directory.
        assert_eq!(
            p.socket,
            Path::new("/home/u/.local/state/bulkhead/bulkhead.sock")
        );
        let env = Env {
            xdg_config_home: Some("/cfg".into()),
            xdg_state_home: Some("/st".into()),
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..user(Some("/home/u"))
        };
        let p = Paths::for_env(&env).unwrap();
        assert_eq!(p.config, Path::new("/cfg/bulkhead/config.toml"));
        assert_eq!(p.state, Path::new("/st/bulkhead"));
        assert_eq!(p.socket, Path::new("/run/user/1000/bulkhead/bulkhead.sock"));
    }

    #[test]
    fn a_user_without_home_or_xdg_has_no_default() {
        let e = Paths::for_env(&user(None)).unwrap_err().to_string();
        assert!(e.contains("$XDG_CONFIG_HOME or $HOME"), "{e}");
    }

    #[test]
    fn the_client_prefers_a_local_up_socket() {
        let dir = tempfile::tempdir().unwrap();
        let env = user(Some("/home/u"));
        assert_eq!(
            client_socket(&env, dir.path()),
            Path::new("/home/u/.local/state/bulkhead/bulkhead.sock")
        );
        // A plain file is not a daemon.
        std::fs::create_dir(dir.path().join(".bulkhead")).unwrap();
        std::fs::write(dir.path().join(LOCAL_SOCKET), "").unwrap();
        assert_ne!(client_socket(&env, dir.path()), Path::new(LOCAL_SOCKET));
        std::fs::remove_file(dir.path().join(LOCAL_SOCKET)).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(dir.path().join(LOCAL_SOCKET)).unwrap();
        assert_eq!(client_socket(&env, dir.path()), Path::new(LOCAL_SOCKET));
    }

    #[test]
    fn the_client_reads_the_socket_of_the_default_configuration_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = Env {
            xdg_config_home: Some(dir.path().join("cfg")),
            ..user(Some("/home/u"))
        };
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir_all(dir.path().join("cfg/bulkhead")).unwrap();
        let file = dir.path().join("cfg/bulkhead/config.toml");
        // Relative to the file, as for the daemon.
        std::fs::write(&file, "socket = \"run/api.sock\"\n").unwrap();
        assert_eq!(
            client_socket(&env, &elsewhere),
            dir.path().join("cfg/bulkhead/run/api.sock")
        );
        // An invalid file is skipped (the daemon reports it): the platform default.
        std::fs::write(&file, "socket = 3\n").unwrap();
        assert_eq!(
            client_socket(&env, &elsewhere),
            Path::new("/home/u/.local/state/bulkhead/bulkhead.sock")
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("/etc/bulkhead/config.toml");
        let e = parse(p, "state = \"/x\"\n\nmax-instancez = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/bulkhead/config.toml:3:1: key `max-instancez`: "),
            "{e}"
        );
        assert!(e.contains("unknown field"), "{e}");
        let e = parse(p, "# c\nmax-instances = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/bulkhead/config.toml:2:"), "{e}");
        assert!(e.contains("key `max-instances`"), "{e}");
        let e = parse(p, "event-retention = 0\n").unwrap_err().to_string();
        assert!(
            e.contains(":1:") && e.contains("key `event-retention`"),
            "{e}"
        );
        let e = parse(p, "port-range = \"9000-80\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `port-range`") && e.contains("9000-80"),
            "{e}"
        );
        let e = parse(p, "min-available-memory = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `min-available-memory`"), "{e}");
    }

    #[test]
    fn values_parse_like_their_flags() {
        let s = parse(
            Path::new("c.toml"),
            "log-max-bytes = \"1Mi\"\nimage-cache-max-bytes = 4096\nwarm-memory = \"64Mi\"\nport-range = \"9000-9100\"\n\
             event-sync = \"full\"\nmetrics = \"127.0.0.1:9464\"\nno-keeper = true\n",
        )
        .unwrap();
        assert_eq!(s.log_max_bytes, Some(1 << 20));
        assert_eq!(s.image_cache_max_bytes, Some(4096));
        assert_eq!(s.warm_memory, Some(64 << 20));
        assert_eq!(s.port_range.unwrap().to_string(), "9000-9100");
        assert_eq!(s.event_sync, Some(crate::cli::EventSync::Full));
        assert_eq!(s.no_keeper, Some(true));
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = ServeArgs {
            state: Some("/from/file".into()),
            max_instances: Some(3),
            no_keeper: Some(true),
            ..ServeArgs::default()
        };
        let flags = ServeArgs {
            max_instances: Some(5),
            no_keeper: Some(false),
            ..ServeArgs::default()
        };
        let s = flags.or_file(file);
        assert_eq!(s.state, Some(PathBuf::from("/from/file")));
        assert_eq!(s.max_instances, Some(5));
        assert_eq!(s.no_keeper, Some(false));
    }

    #[test]
    fn the_swarm_manager_comes_from_the_file_unless_the_command_line_names_one() {
        let file = parse(Path::new("c.toml"), "swarm-host = \"unix:///from/file\"\n").unwrap();
        assert_eq!(file.swarm_host.as_deref(), Some("unix:///from/file"));
        let again = parse(Path::new("c.toml"), "swarm-host = \"unix:///from/file\"\n").unwrap();
        let none = ServeArgs::default().or_file(again);
        assert_eq!(none.swarm_host.as_deref(), Some("unix:///from/file"));
        let flags = ServeArgs {
            swarm_host: Some("tcp://mgr:2375".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            flags.or_file(file).swarm_host.as_deref(),
            Some("tcp://mgr:2375")
        );
    }

    /// `dist/config.toml` documents every setting of `serve` (each `--flag` as a
    /// commented `# flag = ...` line), and with every line uncommented it parses.
    #[test]
    fn the_example_file_has_every_setting_and_parses() {
        use clap::CommandFactory;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // As shipped: everything commented, so it parses to nothing set.
        parse(&path, &text).unwrap();
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        parse(&path, &uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let cli = crate::cli::Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let mut keys: Vec<String> = serve
            .get_arguments()
            .filter(|a| !["config", "help", "version"].contains(&a.get_id().as_str()))
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        // The global flags `serve` reads.
        keys.extend(["socket", "tls-cert", "tls-key"].map(String::from));
        for k in keys {
            assert!(
                uncommented
                    .lines()
                    .any(|l| l.starts_with(&format!("{k} = "))),
                "dist/config.toml has no `# {k} = ...` line"
            );
        }
    }

    /// The defaults `serve --help` states are the ones the daemon applies (the flags have
    /// no clap default, so that a configuration file can set them).
    #[test]
    fn the_help_states_the_real_defaults() {
        use clap::CommandFactory;
        let mut cli = crate::cli::Cli::command();
        let help = cli
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        let d = bulkhead_daemon::Config::new(PathBuf::new(), None, None);
        let mib = |n: u64| format!("[default: {}Mi]", n >> 20);
        for want in [
            mib(d.log_max_bytes),
            mib(d.min_available_memory),
            format!("[default: {}]", d.event_retention),
            format!("[default: {}]", d.finished_kept),
            format!("[default: {}h]", d.finished_ttl.as_secs() / 3600),
            format!("[default: {}]", d.port_range),
        ] {
            assert!(help.contains(&want), "serve --help lacks {want}");
        }
    }
}
