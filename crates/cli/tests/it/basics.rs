//! The process basics (`working_dir`, `env_file`, `user`/`group`/`groups`, `limits`,
//! `umask`) with a real program (`sh`), through the keeper (the default), without it
//! (`--no-keeper`), in the sandbox and in a docker container.

use std::path::Path;
use std::time::Instant;

use crate::harness::*;

/// What the workload prints, one `key=value` per line, then `END`.
pub(crate) const REPORT: &str = "echo pwd=$(pwd); echo uid=$(id -u); echo gid=$(id -g); \
    echo groups=$(id -G); echo nofile=$(ulimit -n); echo core=$(ulimit -c); \
    echo core_hard=$(ulimit -H -c); echo umask=$(umask); echo from_file=$FROM_FILE; \
    echo quoted=$QUOTED; echo both=$BOTH; echo END; exec sleep 1000";

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ends(text: &str) -> usize {
    text.lines()
        .filter(|l| l.trim_end().ends_with("END"))
        .count()
}

/// Launches `name`, waits for its report and returns it as `key=value` lines (of this
/// run: the log may hold an earlier run's).
pub(crate) fn report(d: &Daemon, name: &str) -> Vec<(String, String)> {
    let before = ends(&d.logs_text(&format!("ns:default:{name}")));
    let v = d.json(&["launch", name, "-o", "json"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    loop {
        let text = d.logs_text(&id);
        if ends(&text) > before {
            let run = text
                .lines()
                .scan(0, |n, l| {
                    let this = *n;
                    if l.trim_end().ends_with("END") {
                        *n += 1;
                    }
                    Some((this, l))
                })
                .filter(|(n, _)| *n == before)
                .map(|(_, l)| l)
                .collect::<Vec<_>>();
            return run
                .into_iter()
                .filter_map(|l| {
                    // Log lines may carry a prefix; the report's keys are known.
                    let l = l.trim_end();
                    [
                        "pwd",
                        "uid",
                        "gid",
                        "groups",
                        "nofile",
                        "core",
                        "core_hard",
                        "umask",
                        "from_file",
                        "quoted",
                        "both",
                    ]
                    .iter()
                    .find_map(|k| {
                        let tag = format!("{k}=");
                        l.find(&tag)
                            .filter(|i| *i == 0 || l.as_bytes()[i - 1] == b' ')
                            .map(|i| ((*k).to_owned(), l[i + tag.len()..].to_owned()))
                    })
                })
                .collect();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no report from {id}:\n{text}\n--- daemon log ---\n{}",
            d.daemon_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(crate) fn value<'a>(r: &'a [(String, String)], key: &str) -> &'a str {
    r.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
}

const ENV_FILE: &str = "# settings\nexport FROM_FILE=file-value\nQUOTED=\"a b\"\nBOTH=from-file\n";

fn manifest(extra: &str) -> String {
    format!(
        "name: basics\ncommand: [/bin/sh, -c, '{REPORT}']\nrestart: {{policy: never}}\n\
         env: {{BOTH: from-manifest}}\n{extra}"
    )
}

fn daemon(extra: &str, args: &[&str]) -> Daemon {
    let d = Daemon::start_with_args(&[], args);
    write_workload(
        &d.workloads,
        "basics",
        &manifest(extra),
        &[("app.env", ENV_FILE)],
    );
    std::fs::create_dir_all(d.workloads.join("basics/data")).unwrap();
    assert!(d.cli(&["reload"]).status.success());
    d
}

fn canonical(p: &Path) -> String {
    p.canonicalize().unwrap().display().to_string()
}

/// working_dir (relative), env_file (manifest env wins), limits and umask, as the
/// daemon's own user.
fn directory_environment_limits_umask(args: &[&str]) {
    let d = daemon(
        "working_dir: data\nenv_file: app.env\nlimits: {nofile: 1234, core: {soft: 1Mi, hard: 2Mi}}\numask: \"0027\"\n",
        args,
    );
    let r = report(&d, "basics");
    assert_eq!(
        value(&r, "pwd"),
        canonical(&d.workloads.join("basics/data")),
        "{r:?}"
    );
    assert_eq!(value(&r, "from_file"), "file-value");
    assert_eq!(value(&r, "quoted"), "a b");
    assert_eq!(
        value(&r, "both"),
        "from-manifest",
        "the manifest's env wins"
    );
    assert_eq!(value(&r, "nofile"), "1234");
    // dash counts core sizes in 512-byte blocks.
    assert_eq!(value(&r, "core"), "2048");
    assert_eq!(value(&r, "core_hard"), "4096");
    assert_eq!(value(&r, "umask"), "0027");
}

#[test]
fn working_dir_env_file_limits_and_umask_apply_through_the_keeper() {
    directory_environment_limits_umask(&[]);
}

#[test]
fn working_dir_env_file_limits_and_umask_apply_without_the_keeper() {
    directory_environment_limits_umask(&["--no-keeper"]);
}

/// The control: without the fields, the folder, the daemon's limits and umask.
#[test]
fn without_the_fields_an_instance_starts_in_its_folder_with_the_daemons_settings() {
    let d = daemon("", &[]);
    let r = report(&d, "basics");
    assert_eq!(value(&r, "pwd"), canonical(&d.workloads.join("basics")));
    assert_eq!(value(&r, "from_file"), "");
    assert_ne!(value(&r, "nofile"), "1234");
    assert_ne!(value(&r, "umask"), "0027");
}

fn user_nobody(args: &[&str]) {
    if !is_root() {
        eprintln!("skipped: switching users needs a daemon running as root");
        return;
    }
    // An absolute working_dir (`/`: one that nobody may enter). The exec probe passes
    // only as the instance runs: as nobody, in `/`.
    let d = daemon(
        "user: nobody\nworking_dir: /\n\
         readiness: {exec: [/bin/sh, -c, \"test $(id -u) = 65534 && test $(pwd) = /\"], timeout: 20s}\n",
        args,
    );
    let r = report(&d, "basics");
    assert_eq!(value(&r, "uid"), "65534", "{r:?}");
    assert_eq!(value(&r, "gid"), "65534");
    assert_eq!(value(&r, "groups"), "65534", "nobody's groups, not root's");
    assert_eq!(value(&r, "pwd"), "/");
    // exec runs as the instance runs: its user, in its working directory.
    let o = d.cli(&["exec", "ns:default:basics", "--", "sh", "-c", "id -u; pwd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "65534\n/\n",
        "{}",
        stderr(&o)
    );
    d.cli(&["terminate", "ns:default:basics"]);

    // group and supplementary groups by name and by number.
    write_workload(
        &d.workloads,
        "basics",
        &manifest("user: 65534\ngroup: nogroup\ngroups: [daemon, 7]\nworking_dir: /\n"),
        &[],
    );
    assert!(d.cli(&["reload"]).status.success());
    let r = report(&d, "basics");
    assert_eq!(value(&r, "uid"), "65534");
    assert_eq!(value(&r, "gid"), "65534");
    assert_eq!(value(&r, "groups"), "65534 1 7");
}

#[test]
fn user_group_and_groups_apply_through_the_keeper() {
    user_nobody(&[]);
}

#[test]
fn user_group_and_groups_apply_without_the_keeper() {
    user_nobody(&["--no-keeper"]);
}

/// A launch that fails: its error text (CLI stderr).
fn failed_launch(d: &Daemon, name: &str) -> String {
    let o = d.cli(&["launch", name]);
    assert!(!o.status.success(), "launch of {name} succeeded");
    stderr(&o)
}

#[test]
fn a_user_that_does_not_exist_fails_the_launch_naming_it() {
    for args in [&[][..], &["--no-keeper"][..]] {
        let d = daemon("user: no-such-user-here\n", args);
        let e = failed_launch(&d, "basics");
        assert!(
            e.contains("user no-such-user-here: no such user"),
            "{args:?}: {e}"
        );
    }
    // The sandbox resolves names in the same database (which it shows at /etc).
    let d = daemon("driver: sandbox\nuser: no-such-user-here\n", &[]);
    if crate::sandbox::sandbox_available(&d) {
        let e = failed_launch(&d, "basics");
        assert!(e.contains("user no-such-user-here: no such user"), "{e}");
    }
}

#[test]
fn a_working_dir_that_does_not_exist_fails_the_launch_naming_it() {
    for args in [&[][..], &["--no-keeper"][..]] {
        let d = daemon("working_dir: missing\n", args);
        let e = failed_launch(&d, "basics");
        let dir = d.workloads.join("basics/missing");
        assert!(
            e.contains(&format!("working_dir {}: no such directory", dir.display())),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn a_working_dir_the_user_cannot_enter_fails_the_launch() {
    if !is_root() {
        eprintln!("skipped: switching users needs a daemon running as root");
        return;
    }
    let d = daemon("user: nobody\nworking_dir: data\n", &[]);
    use std::os::unix::fs::PermissionsExt;
    let data = d.workloads.join("basics/data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = failed_launch(&d, "basics");
    assert!(e.contains("ermission denied"), "{e}");
}

#[test]
fn an_env_file_is_read_at_each_start_and_a_bad_one_fails_the_start_naming_file_and_line() {
    let d = daemon("env_file: [app.env]\n", &[]);
    let r = report(&d, "basics");
    assert_eq!(value(&r, "from_file"), "file-value");
    assert!(d.cli(&["terminate", "ns:default:basics"]).status.success());

    // Edited: the next start sees the new value, with no reload.
    let file = d.workloads.join("basics/app.env");
    std::fs::write(&file, "FROM_FILE=edited\n").unwrap();
    let r = report(&d, "basics");
    assert_eq!(value(&r, "from_file"), "edited");
    assert!(d.cli(&["terminate", "ns:default:basics"]).status.success());

    // Malformed: the launch fails, naming the file and the line.
    std::fs::write(&file, "A=1\n\nthis is not a pair\n").unwrap();
    let e = failed_launch(&d, "basics");
    assert!(
        e.contains(&format!(
            "env_file {}: line 3: expected KEY=value",
            file.display()
        )),
        "{e}"
    );
    // Missing: the same, naming the file.
    std::fs::remove_file(&file).unwrap();
    let e = failed_launch(&d, "basics");
    assert!(
        e.contains(&format!("cannot read env_file {}", file.display())),
        "{e}"
    );
}

#[test]
fn a_bad_field_is_a_manifest_error_naming_it() {
    let d = daemon("umask: \"0999\"\n", &[]);
    let e = failed_launch(&d, "basics");
    assert!(e.contains("umask"), "{e}");
}

/// docker: `working_dir` (absolute, inside), `user`/`group`, `groups`, `limits` (the
/// engine's ulimits) and `env_file`.
#[test]
fn working_dir_user_groups_limits_and_env_file_apply_in_a_container() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let d = Daemon::start(&[]);
    let m = format!(
        "name: basics\ndriver: docker\ncommand: [/bin/sh, -c, '{REPORT}']\nrestart: {{policy: never}}\n\
         env: {{BOTH: from-manifest}}\nenv_file: app.env\nworking_dir: /srv/app\nuser: \"65534\"\n\
         group: \"65533\"\ngroups: [\"7\"]\nlimits: {{nofile: 1234, core: {{soft: 1Mi, hard: 2Mi}}}}\n\
         docker: {{image: {}}}\n",
        crate::docker::IMAGE
    );
    write_workload(&d.workloads, "basics", &m, &[("app.env", ENV_FILE)]);
    assert!(d.cli(&["reload"]).status.success());
    let r = report(&d, "basics");
    assert_eq!(value(&r, "pwd"), "/srv/app", "{r:?}");
    assert_eq!(value(&r, "uid"), "65534");
    assert_eq!(value(&r, "gid"), "65533");
    assert_eq!(value(&r, "groups"), "65533 7");
    assert_eq!(value(&r, "nofile"), "1234");
    // busybox's ash counts core sizes in 512-byte blocks, as dash does.
    assert_eq!(value(&r, "core"), "2048");
    assert_eq!(value(&r, "core_hard"), "4096");
    assert_eq!(value(&r, "from_file"), "file-value");
    assert_eq!(value(&r, "both"), "from-manifest");
    assert!(d.cli(&["terminate", "ns:default:basics"]).status.success());
}

/// sandbox: `user`/`groups` are ids inside its user namespace (names from the host's
/// database, which the sandbox shows at `/etc`), `working_dir` relative to the folder,
/// `limits`, `umask` and `env_file`.
#[test]
fn user_groups_working_dir_limits_umask_and_env_file_apply_in_the_sandbox() {
    let d = daemon(
        "driver: sandbox\nuser: nobody\ngroups: [daemon]\nworking_dir: data\nenv_file: app.env\n\
         limits: {nofile: 1234, core: {soft: 1Mi, hard: 2Mi}}\numask: \"0027\"\n",
        &[],
    );
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let r = report(&d, "basics");
    assert_eq!(value(&r, "uid"), "65534", "{r:?}");
    assert_eq!(value(&r, "gid"), "65534");
    assert_eq!(value(&r, "groups"), "65534 1");
    assert_eq!(
        value(&r, "pwd"),
        canonical(&d.workloads.join("basics/data"))
    );
    assert_eq!(value(&r, "nofile"), "1234");
    assert_eq!(value(&r, "core"), "2048");
    assert_eq!(value(&r, "core_hard"), "4096");
    assert_eq!(value(&r, "umask"), "0027");
    assert_eq!(value(&r, "from_file"), "file-value");
    assert_eq!(value(&r, "both"), "from-manifest");
}

/// In a user namespace no hard limit can be raised: the start fails naming the limit.
#[test]
fn a_hard_limit_the_sandbox_cannot_raise_fails_the_start_naming_it() {
    let d = daemon("driver: sandbox\nlimits: {nofile: 1073741816}\n", &[]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    let e = failed_launch(&d, "basics");
    assert!(
        e.contains("limits.nofile: the hard limit 1073741816"),
        "{e}"
    );
}

/// An instance running as another user cannot reach the daemon's state directory: its
/// notify socket is an abstract one, and `READY=1` from it makes it ready.
#[test]
fn an_instance_running_as_another_user_can_notify_readiness() {
    if !is_root() {
        eprintln!("skipped: switching users needs a daemon running as root");
        return;
    }
    let Some(py) = system_python3() else { return };
    let m = format!(
        "name: notifier\nuser: nobody\nworking_dir: /\nreadiness: {{notify: true, timeout: 20s}}\n\
         command: [{py}, -c, 'import os,socket,time; a=os.environ[\"NOTIFY_SOCKET\"]; print(a, flush=True); \
         s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
         s.sendto(b\"READY=1\", \"\\0\"+a[1:] if a.startswith(\"@\") else a); time.sleep(1000)']\n"
    );
    let d = Daemon::start(&[("notifier", &m)]);
    let v = d.json(&["launch", "notifier", "-o", "json"]);
    assert_eq!(v["state"], "ready", "{v}");
    assert!(d
        .logs_text("ns:default:notifier")
        .contains("@bulkhead-notify-"));
}

/// A failed start says what failed, for machines: `failure_kind` beside the reason, in
/// the `launch_failed` event (JSON and text), through the keeper and without it.
#[test]
fn a_failed_launch_event_says_which_kind_of_failure_it_was() {
    for args in [&[][..], &["--no-keeper"][..]] {
        let d = Daemon::start_with_args(
            &[
                ("noprog", "name: noprog\ncommand: [/no/such/program-here]\n"),
                (
                    "nodir",
                    "name: nodir\ncommand: [sleep, \"100\"]\nworking_dir: missing\n",
                ),
                (
                    "early",
                    "name: early\ncommand: [sh, -c, \"exit 3\"]\nreadiness: {notify: true}\n",
                ),
            ],
            args,
        );
        for (name, kind) in [("noprog", "exec"), ("nodir", "setup"), ("early", "exited")] {
            let o = d.cli(&["launch", name]);
            assert!(!o.status.success(), "{args:?}: launch of {name} succeeded");
            let id = format!("ns:default:{name}");
            let e = d.wait_event(&format!("launch_failed of {name}"), |e| {
                e["kind"] == "launch_failed" && e["instance"] == id.as_str()
            });
            assert_eq!(e["failure_kind"], kind, "{args:?}: {e}");
            assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
        }
        let text = String::from_utf8_lossy(&d.cli(&["events"]).stdout).into_owned();
        assert!(
            text.lines()
                .any(|l| l.contains("ns:default:noprog launch_failed")
                    && l.contains("failure_kind=exec reason=")),
            "{args:?}: {text}"
        );
    }
}
