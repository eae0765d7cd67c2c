//! The data plane across the walls, through the real daemon: the Rust and Python echo
//! workloads behind the sandbox and inside a docker container (Python on a Debian image
//! bulkhead makes with debootstrap) answer host -> workload -> host round trips, and a
//! crash releases the workload's shared memory. Each test prints why it skips
//! when its driver is unavailable here.

use std::path::PathBuf;
use std::process::Command;

use crate::dataplane::{
    data_segments, echo_bin, iox2_of, launch, round_trip, stop_and_clean, wait_until,
};
use crate::harness::{stderr, Daemon};

/// The echo manifest for `driver`, with `extra` lines (the driver's own section).
fn walled_echo(driver: &str, command: &str, extra: &str) -> String {
    format!(
        "name: echo\ndriver: {driver}\ncommand: [{command:?}]\nisolation: session\n\
         restart: {{policy: never}}\nreadiness: {{notify: true, timeout: 30s}}\n\
         shutdown: {{grace: 2s}}\nchannels:\n  inputs: [{{name: input, max_payload: 64Ki}}]\n  \
         outputs: [{{name: output, max_payload: 64Ki}}]\n{extra}"
    )
}

/// The `sandbox:` section that makes the workspace (the examples, the SDK) and the echo
/// binary visible inside, read-only: the minimal root shows neither, and a checkout may
/// live under `/tmp`, which is private. Otherwise the default wall: the instance's
/// channels are in its session's channel space, which belongs to its tenant's ids.
fn sandbox_section(extra: &str) -> String {
    let workspace = std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .expect("the workspace");
    let bin_dir = std::path::Path::new(echo_bin())
        .parent()
        .expect("the echo binary's folder")
        .to_owned();
    format!(
        "sandbox: {{binds: [{{source: {:?}, readonly: true}}, {{source: {:?}, readonly: true}}]{extra}}}\n",
        workspace.display().to_string(),
        bin_dir.display().to_string()
    )
}

/// Round trip, then the workload is killed by `kill`: its crash is reported and the data
/// segment of its output publisher (the only one left then) is reclaimed.
fn round_trip_then_crash(d: Daemon, kill: impl FnOnce(&Daemon)) {
    assert_eq!(launch(&d, "echo", "w1")["state"], "ready");
    let id = "session:w1:echo";
    round_trip(&d, id, "input", id, "output");
    let iox2 = iox2_of(&d, id);
    // The sender's publisher goes when `pipe send` ends; the workload's stays.
    wait_until("one publisher: the workload's", || {
        data_segments(&iox2).len() == 1
    });
    kill(&d);
    d.wait_event("echo crashed", |e| {
        e["instance"] == id && e["kind"] == "crashed"
    });
    wait_until("the workload's data segment reclaimed", || {
        data_segments(&iox2).is_empty()
    });
    stop_and_clean(d, &iox2);
}

/// SIGKILL to the sandboxed instance `session:w1:echo` (its init: the whole namespace
/// goes), behind bulkhead's back.
fn kill_sandboxed(d: &Daemon) {
    let pid = d.json(&["get", "session:w1:echo", "-o", "json"])["pid"]
        .as_u64()
        .expect("the sandboxed instance has a pid");
    // SAFETY: kill(2) on the host pid of this test's own instance.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

#[test]
fn sandboxed_workload_round_trip_and_crash_releases_shared_memory() {
    let m = walled_echo("sandbox", echo_bin(), &sandbox_section(""));
    let d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    round_trip_then_crash(d, kill_sandboxed);
}

/// The same from a warm slot, whose space was mounted in at the hand-over: the crash
/// still releases the workload's shared memory.
#[test]
fn a_sandboxed_workload_from_a_warm_slot_round_trips_and_its_crash_releases_shared_memory() {
    let m = walled_echo(
        "sandbox",
        echo_bin(),
        &format!("{}warm: {{size: 1}}\n", sandbox_section("")),
    );
    let d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    crate::warm::wait_ready_slots(&d, "echo", 1);
    round_trip_then_crash(d, |d| {
        assert!(
            crate::warm::from_slot(d, "session:w1:echo"),
            "{}",
            d.daemon_log()
        );
        kill_sandboxed(d)
    });
}

/// The `docker.mounts` that let the host-built echo binary run in the busybox image: the
/// binary, its dynamic loader and the libraries `ldd` resolves, each read-only at the
/// path the loader looks for it. (A static build would need the whole dependency tree
/// rebuilt for another target; a bind of the few files does not.)
fn echo_mounts() -> String {
    let bin = echo_bin();
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    assert!(out.status.success(), "ldd {bin}: {}", stderr(&out));
    let mut mounts = vec![format!(
        "    - {{source: {bin:?}, target: /bulkhead/echo, read_only: true}}\n"
    )];
    // Lines are `name => /path (addr)`, `/path (addr)` (the loader) or `vdso (addr)`.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let src = std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
            mounts.push(format!(
                "    - {{source: {:?}, target: {p:?}, read_only: true}}\n",
                src.display().to_string()
            ));
        }
    }
    format!(
        "docker:\n  image: {}\n  mounts:\n{}",
        crate::docker::IMAGE,
        mounts.concat()
    )
}

#[test]
fn docker_workload_round_trip_and_crash_releases_shared_memory() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let m = walled_echo("docker", "/bulkhead/echo", &echo_mounts());
    let d = Daemon::start(&[("echo", &m)]);
    round_trip_then_crash(d, |d| {
        // This daemon's container (the engine is shared with other test runs).
        let daemon = std::fs::read_to_string(d.state.join("daemon-id")).expect("daemon-id");
        let out = Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=bulkhead.daemon={}", daemon.trim()),
                "--filter",
                "label=bulkhead.instance=session:w1:echo",
            ])
            .output()
            .expect("run docker ps");
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(ids.len(), 1, "one container: {ids:?}");
        // Killed behind bulkhead's back, through the engine.
        let out = Command::new("docker")
            .args(["kill", &ids[0]])
            .output()
            .expect("run docker kill");
        assert!(out.status.success(), "{}", stderr(&out));
    });
}

/// The example `examples/workloads/echo-python-docker`, its folder, and why it cannot run
/// here if it cannot: it needs debootstrap and the iceoryx2 wheels in its `wheels/` folder
/// (fetched here with pip when missing, as its manifest says; CI's setup-dataplane.sh
/// fetches it first).
fn python_docker_example() -> Result<(String, PathBuf), String> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workloads/echo-python-docker"
    ));
    let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Err("no debootstrap (apt-get install debootstrap)".into());
    }
    let wheels = dir.join("wheels");
    let has_wheel = |w: &std::path::Path| {
        std::fs::read_dir(w).is_ok_and(|mut d| {
            d.any(|e| {
                e.is_ok_and(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("iceoryx2-") && n.ends_with(".whl")
                })
            })
        })
    };
    if !has_wheel(&wheels) {
        let out = Command::new("python3")
            .args(["-m", "pip", "download", "--quiet"])
            .args(["--only-binary=:all:", "iceoryx2==0.10.*", "-d"])
            .arg(&wheels)
            .output()
            .map_err(|e| format!("cannot run pip: {e}"))?;
        if !out.status.success() || !has_wheel(&wheels) {
            return Err(format!(
                "cannot fetch the iceoryx2 wheel into {}: {}",
                wheels.display(),
                stderr(&out)
            ));
        }
    }
    let text = std::fs::read_to_string(dir.join("manifest.yaml")).map_err(|e| e.to_string())?;
    // The test daemon reads its manifests from a folder of its own: the build context is
    // the example's folder, spelled out.
    assert!(text.contains("context: .\n"), "the example's context moved");
    let text = text.replace(
        "context: .\n",
        &format!("context: {:?}\n", dir.display().to_string()),
    );
    Ok((text, dir))
}

#[test]
fn python_workload_in_docker_on_a_debootstrap_image_round_trips() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let manifest = match python_docker_example() {
        Ok((m, _)) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let name = "echo-python-docker";
    let d = Daemon::start(&[(name, &manifest)]);
    // The first launch makes the debootstrap base (unless the engine has it from an
    // earlier run), builds the image on it, and is ready when the Python workload says
    // READY=1 through $NOTIFY_SOCKET from inside its container.
    let started = std::time::Instant::now();
    assert_eq!(launch(&d, name, "py1")["state"], "ready");
    eprintln!("first launch (image made): {:?}", started.elapsed());
    let id = format!("session:py1:{name}");
    round_trip(&d, &id, "input", &id, "output");
    let imgs = d.json(&["images", "-o", "json"]);
    let list = imgs.as_array().unwrap();
    assert_eq!(list.len(), 2, "the base and the workload's image: {imgs}");
    let base = list
        .iter()
        .find(|i| i["workload"] == "(debootstrap bookworm)" && i["in_use"] == false)
        .unwrap_or_else(|| panic!("the debootstrap base is cached: {imgs}"));
    assert!(
        list.iter()
            .any(|i| i["workload"] == name && i["in_use"] == true && i["base"] == base["tag"]),
        "the workload's image is in use and built on the base: {imgs}"
    );
    // A second session: the image comes from the cache.
    let started = std::time::Instant::now();
    assert_eq!(launch(&d, name, "py2")["state"], "ready");
    eprintln!("second launch (cached image): {:?}", started.elapsed());
    assert_eq!(
        d.json(&["images", "-o", "json"]).as_array().unwrap().len(),
        2
    );
    let id2 = format!("session:py2:{name}");
    round_trip(&d, &id2, "input", &id2, "output");
    let iox2 = iox2_of(&d, &id);
    for s in ["py1", "py2"] {
        let o = d.cli(&["end-session", s]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    wait_until("both containers' data segments reclaimed", || {
        data_segments(&iox2).is_empty()
    });
    // The images go with the test (base last): nothing is left in the engine.
    wait_until("the containers removed", || {
        d.json(&["images", "-o", "json"])
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["in_use"] == false)
    });
    let pruned = d.json(&["images", "prune", "-o", "json"]);
    assert_eq!(pruned.as_array().unwrap().len(), 2, "{pruned}");
    stop_and_clean(d, &iox2);
}

/// iceoryx2's files are private to their owner: the walled instances of one scope's
/// channel space must run as one host user. Another user is refused with the reason, and
/// gets a space of its own under another key.
#[test]
fn walled_instances_of_one_space_must_run_as_one_host_user() {
    let m = walled_echo("sandbox", echo_bin(), &sandbox_section(""));
    let host = walled_echo(
        "sandbox",
        echo_bin(),
        &sandbox_section(", user_namespace: host"),
    )
    .replacen("name: echo", "name: echo2", 1);
    let d = Daemon::start(&[("echo", &m), ("echo2", &host)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    assert_eq!(launch(&d, "echo", "u1")["state"], "ready");
    let out = d.cli(&["launch", "echo2", "--session", "u1"]);
    assert!(!out.status.success(), "the launch is refused");
    let err = stderr(&out);
    assert!(
        err.contains("channel space of session.u1 belongs to host uid")
            && err.contains("would run as uid 0"),
        "{err}"
    );
    assert_eq!(launch(&d, "echo2", "u2")["state"], "ready");
    round_trip(
        &d,
        "session:u2:echo2",
        "input",
        "session:u2:echo2",
        "output",
    );
    round_trip(&d, "session:u1:echo", "input", "session:u1:echo", "output");
}

/// A docker container with channels must name its user by number: the space is given
/// to that user before the container starts.
#[test]
fn a_docker_user_given_by_name_with_channels_is_refused_with_the_reason() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let m = walled_echo(
        "docker",
        "/bulkhead/echo",
        &format!("{}  user: nobody\n", echo_mounts()),
    );
    let d = Daemon::start(&[("echo", &m)]);
    let out = d.cli(&["launch", "echo", "--session", "u3"]);
    assert!(!out.status.success(), "the launch is refused");
    let err = stderr(&out);
    assert!(
        err.contains("docker.user \"nobody\"") && err.contains("numeric"),
        "{err}"
    );
}

#[test]
fn python_workload_in_the_sandbox_round_trips_and_its_crash_releases_shared_memory() {
    if !crate::dataplane::python_with_iceoryx2() {
        return;
    }
    let main = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workloads/echo-python/main.py"
    );
    // The same python3 the test found, which may live under /root (pyenv) with its
    // iceoryx2 binding: the host's root is opened, read-only, for it, and the host's ids
    // (/root is private to its owner).
    let m = walled_echo(
        "sandbox",
        "python3",
        &sandbox_section(", root: host, user_namespace: host"),
    )
    .replacen(
        "command: [\"python3\"]",
        &format!("command: [python3, {main:?}]"),
        1,
    );
    assert!(m.contains("main.py"), "{m}");
    let d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    round_trip_then_crash(d, kill_sandboxed);
}

/// What tenant `tb` sees and can do, from inside its instance (`bulkhead exec`), of
/// tenant `ta`'s channels (`driver` runs both): its listing of `/dev/shm` and iceoryx2's
/// root, and whether it could read and write a data segment of `ta`'s. Returns the
/// listing, the attack's output, `ta`'s file names and `tb`'s. With `warm`, both are
/// launched in warm slots (checked), whose spaces are mounted in at the hand-over.
fn cross_tenant(
    driver: &str,
    extra: &str,
    warm: bool,
) -> Option<(String, String, Vec<String>, Vec<String>)> {
    let command = if driver == "docker" {
        "/bulkhead/echo"
    } else {
        echo_bin()
    };
    let pool = if warm { "warm: {size: 2}\n" } else { "" };
    let m = walled_echo(driver, command, &format!("{extra}{pool}"));
    let d = Daemon::start(&[("echo", &m)]);
    if driver == "sandbox" && !crate::sandbox::sandbox_available(&d) {
        return None;
    }
    if warm {
        crate::warm::wait_ready_slots(&d, "echo", 2);
    }
    for s in ["ta", "tb"] {
        assert_eq!(launch(&d, "echo", s)["state"], "ready");
        let id = format!("session:{s}:echo");
        assert_eq!(
            crate::warm::from_slot(&d, &id),
            warm,
            "{id} from a slot:\n{}",
            d.daemon_log()
        );
        if driver == "process" {
            continue;
        }
        // A new session takes the space its slot was made with, at the scope's path.
        let space = iox2_of(&d, &id)
            .space
            .expect("a walled instance has a space");
        assert!(
            space.ends_with(format!("channels/session.{s}")),
            "{space:?}"
        );
        assert_eq!(
            d.daemon_log().contains(&format!(
                "channel space session.{s}: the one made with its warm slot"
            )),
            warm,
            "{}",
            d.daemon_log()
        );
    }
    round_trip(&d, "session:ta:echo", "input", "session:ta:echo", "output");
    let names = |id: &str| -> Vec<(PathBuf, String)> {
        bulkhead_sdk::leftover_files(&iox2_of(&d, id))
            .into_iter()
            .map(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                (p, n)
            })
            .collect()
    };
    let a = names("session:ta:echo");
    let b = names("session:tb:echo");
    // The workload's output publisher: a data segment of ta's.
    let seg = a
        .iter()
        .find(|(p, _)| p.extension().is_some_and(|e| e == "data"))
        .map(|(_, n)| n.clone())
        .expect("ta has a data segment");
    let listing = d.cli(&[
        "exec",
        "session:tb:echo",
        "--",
        "sh",
        "-c",
        "ls -aR /dev/shm /tmp/iceoryx2",
    ]);
    let attack = d.cli(&[
        "exec",
        "session:tb:echo",
        "--",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/shm/{seg} bs=1 count=1 2>&1 >/dev/null && echo READ; \
             printf x | dd of=/dev/shm/{seg} bs=1 count=1 conv=notrunc,nocreat 2>&1 && echo WROTE"
        ),
    ]);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // Only ta's channel files: the per-state-dir prefix keeps other runs out.
    let own = |v: Vec<(PathBuf, String)>| v.into_iter().map(|(_, n)| n).collect();
    Some((text(&listing), text(&attack), own(a), own(b)))
}

/// What [`cross_tenant`] saw behind a wall: tb lists its own files and none of ta's
/// (names both have, a node's `node.details`, say nothing), and neither reads nor writes
/// ta's segment.
fn assert_walled_off(listing: &str, attack: &str, a: &[String], b: &[String]) {
    assert!(!a.is_empty() && !b.is_empty());
    for n in b {
        assert!(
            listing.contains(n.as_str()),
            "tb sees its own {n}:\n{listing}"
        );
    }
    let only_a: Vec<&String> = a.iter().filter(|n| !b.contains(n)).collect();
    assert!(only_a.iter().any(|n| n.ends_with(".data")), "{a:?}");
    for n in only_a {
        assert!(
            !listing.contains(n.as_str()),
            "tb sees ta's {n}:\n{listing}"
        );
    }
    assert!(
        !attack.contains("READ") && !attack.contains("WROTE"),
        "{attack}"
    );
}

/// The data plane per scope: a sandboxed tenant lists, reads and writes only its own
/// scope's shared memory and service records. Control: two process workloads (no wall)
/// share the host's `/dev/shm`, and the same attack reads and writes the other's segment.
#[test]
fn a_tenant_cannot_list_read_or_write_another_tenants_channels() {
    let Some((listing, attack, a, b)) = cross_tenant("sandbox", &sandbox_section(""), false) else {
        return;
    };
    assert_walled_off(&listing, &attack, &a, &b);
    assert!(attack.contains("No such file"), "{attack}");

    let (listing, attack, a, _) =
        cross_tenant("process", "", false).expect("process runs anywhere");
    assert!(
        a.iter()
            .filter(|n| n.ends_with(".data"))
            .all(|n| listing.contains(n.as_str())),
        "the control: without a wall tb lists ta's segments:\n{listing}"
    );
    assert!(
        attack.contains("READ") && attack.contains("WROTE"),
        "the control: {attack}"
    );
}

/// The same attack between two docker containers: each is shown its own scope's space.
/// The control is the process pair above (the docker wall has no opening that shares
/// one space between two sessions).
#[test]
fn a_tenant_in_docker_cannot_list_read_or_write_another_tenants_channels() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let (listing, attack, a, b) =
        cross_tenant("docker", &echo_mounts(), false).expect("docker is available");
    assert_walled_off(&listing, &attack, &a, &b);
    assert!(attack.contains("No such file"), "{attack}");
}

/// Channels from warm slots: a slot is made before anyone knows its tenant, so the
/// tenant's space is mounted into it at the hand-over. Two sessions launched in slots
/// each see their own space, the round trip works, and the attack above fails as it does
/// between cold instances (its control is the process pair above).
#[test]
fn tenants_launched_in_warm_sandbox_slots_get_their_own_channel_space() {
    let Some((listing, attack, a, b)) = cross_tenant("sandbox", &sandbox_section(""), true) else {
        return;
    };
    assert_walled_off(&listing, &attack, &a, &b);
    assert!(attack.contains("No such file"), "{attack}");
}

/// The spaces warm slots are made with go with the slots: after a stop, nothing of a
/// channel space is left mounted or on disk (the control: while the daemon runs, the
/// ready slots' spaces are there).
#[test]
fn a_stop_removes_the_spaces_of_the_warm_slots() {
    let m = walled_echo(
        "sandbox",
        echo_bin(),
        &format!("{}warm: {{size: 2}}\n", sandbox_section("")),
    );
    let mut d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    crate::warm::wait_ready_slots(&d, "echo", 2);
    let channels = d.state.join("channels");
    let spaces = || -> Vec<String> {
        std::fs::read_dir(&channels)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mounted = || -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(channels.to_str().unwrap()))
            .map(str::to_owned)
            .collect()
    };
    let before = spaces();
    assert_eq!(
        before.iter().filter(|n| n.starts_with("warm.")).count(),
        2,
        "{before:?}"
    );
    assert_eq!(mounted().len(), 2, "{:?}", mounted());
    assert!(d.sigterm().success(), "{}", d.daemon_log());
    assert_eq!(spaces(), Vec::<String>::new());
    assert_eq!(mounted(), Vec::<String>::new());
}

/// Two workloads of one session from warm docker slots share the session's space: the
/// first takes the space its slot was made with, the second's slot was made with another
/// (no slot knows its session), and the driver mounts the session's over it into the
/// container before the program runs. Both round trips work, and both name one space.
#[test]
fn a_second_workload_of_a_session_from_a_warm_slot_joins_the_sessions_space() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let m = walled_echo(
        "docker",
        "/bulkhead/echo",
        &format!("{}warm: {{size: 1}}\n", echo_mounts()),
    );
    let m2 = m.replacen("name: echo", "name: echo2", 1);
    let d = Daemon::start(&[("echo", &m), ("echo2", &m2)]);
    crate::warm::wait_ready_slots(&d, "echo", 1);
    crate::warm::wait_ready_slots(&d, "echo2", 1);
    assert_eq!(launch(&d, "echo", "j1")["state"], "ready");
    assert_eq!(launch(&d, "echo2", "j1")["state"], "ready");
    let (a, b) = ("session:j1:echo", "session:j1:echo2");
    for id in [a, b] {
        assert!(crate::warm::from_slot(&d, id), "{id}: {}", d.daemon_log());
    }
    assert_eq!(iox2_of(&d, a).space, iox2_of(&d, b).space);
    round_trip(&d, a, "input", a, "output");
    round_trip(&d, b, "input", b, "output");
}

/// The same with warm docker slots: the space is mounted into the container's mount
/// namespace before its init execs the program.
#[test]
fn tenants_launched_in_warm_docker_slots_get_their_own_channel_space() {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let (listing, attack, a, b) =
        cross_tenant("docker", &echo_mounts(), true).expect("docker is available");
    assert_walled_off(&listing, &attack, &a, &b);
    assert!(attack.contains("No such file"), "{attack}");
}

/// A tenant's channel space is bounded (what the channels declare, plus a little), and
/// what a workload leaves there goes with the space when the scope's last channel
/// instance is final: a 256 MiB fill of `/dev/shm` stops short, and is gone afterwards.
#[test]
fn a_channel_space_is_bounded_and_goes_with_its_last_instance() {
    let m = walled_echo("sandbox", echo_bin(), &sandbox_section(""));
    let d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    assert_eq!(launch(&d, "echo", "tf")["state"], "ready");
    let space = iox2_of(&d, "session:tf:echo")
        .space
        .expect("a sandboxed instance's channels are in a space");
    assert!(
        space.ends_with("channels/session.tf"),
        "{}",
        space.display()
    );
    let out = d.cli(&[
        "exec",
        "session:tf:echo",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/shm/fill bs=1048576 count=256 2>&1; wc -c < /dev/shm/fill",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("No space left"), "{text}");
    let written: u64 = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("a byte count: {text}"));
    assert!(
        written > 0 && written < 64 << 20,
        "{written} bytes written into a space sized for two 64 KiB channels"
    );
    assert!(bulkhead_sdk::space::shm_dir(&space).join("fill").exists());
    let o = d.cli(&["terminate", "session:tf:echo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !space.exists(),
        "the space went with its last instance: {}",
        space.display()
    );
}

/// A process instance's channels are in the host's space, a walled one's in its scope's:
/// a pipeline between them could never carry data, so it is refused naming the channel.
#[test]
fn a_pipeline_between_a_process_and_a_walled_instance_is_refused() {
    let src = walled_echo("process", echo_bin(), "").replacen("name: echo", "name: src", 1);
    let sink = walled_echo("sandbox", echo_bin(), &sandbox_section(""))
        .replacen("name: echo", "name: sink", 1)
        .replacen(
            "inputs: [{name: input, max_payload: 64Ki}]",
            "inputs: [{name: input, max_payload: 64Ki, from: src.output}]",
            1,
        );
    assert!(sink.contains("from: src.output"), "{sink}");
    let d = Daemon::start(&[("src", &src), ("sink", &sink)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    assert_eq!(launch(&d, "src", "pm")["state"], "ready");
    let out = d.cli(&["launch", "sink", "--session", "pm"]);
    assert!(!out.status.success(), "the launch is refused");
    let err = stderr(&out);
    assert!(
        err.contains("channel bulkhead/session/pm/src/output is held by session:pm:src")
            && err.contains("host's space"),
        "{err}"
    );
}

/// A daemon that crashed leaves its channel spaces mounted (its sandboxed instances died
/// with it); the next one removes those no adopted instance needs.
#[test]
fn channel_spaces_a_crashed_daemon_left_are_removed_at_the_next_start() {
    let m = walled_echo("sandbox", echo_bin(), &sandbox_section(""));
    let mut d = Daemon::start(&[("echo", &m)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    assert_eq!(launch(&d, "echo", "cr")["state"], "ready");
    let space = iox2_of(&d, "session:cr:echo").space.expect("a space");
    d.kill9();
    assert!(space.exists(), "left behind by the crash");
    d.spawn();
    assert!(!space.exists(), "{} is still there", space.display());
}

/// The process driver is no wall, but a process workload that runs as another host user
/// (here one that drops to `nobody`) reads no one's channels: iceoryx2's files are 0600,
/// and the channel spaces are under the state directory (0700). The control runs the same
/// commands without dropping: root reads, writes and lists all of it.
#[test]
fn a_process_workload_running_as_another_user_reads_no_channels() {
    let process = walled_echo("process", echo_bin(), "");
    let walled = walled_echo("sandbox", echo_bin(), &sandbox_section("")).replacen(
        "name: echo",
        "name: sbx",
        1,
    );
    let d = Daemon::start(&[("echo", &process), ("sbx", &walled)]);
    if !crate::sandbox::sandbox_available(&d) {
        return;
    }
    assert_eq!(launch(&d, "echo", "pa")["state"], "ready");
    assert_eq!(launch(&d, "sbx", "pb")["state"], "ready");
    let seg = bulkhead_sdk::leftover_files(&iox2_of(&d, "session:pa:echo"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("a data segment of the process instance");
    let space = iox2_of(&d, "session:pb:sbx").space.expect("a space");
    let attack = format!(
        "dd if={seg} bs=1 count=1 2>&1 >/dev/null && echo READ; \
         printf x | dd of={seg} bs=1 count=1 conv=notrunc,nocreat 2>&1 && echo WROTE; \
         ls {shm} 2>&1 && echo LISTED",
        seg = seg.display(),
        shm = bulkhead_sdk::space::shm_dir(&space).display()
    );
    let run = |argv: &[&str]| {
        let mut args = vec!["exec", "session:pa:echo", "--"];
        args.extend_from_slice(argv);
        let o = d.cli(&args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let dropped = run(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        &attack,
    ]);
    for done in ["READ", "WROTE", "LISTED"] {
        assert!(!dropped.contains(done), "as nobody: {dropped}");
    }
    assert!(dropped.contains("Permission denied"), "{dropped}");
    let root = run(&["sh", "-c", &attack]);
    for done in ["READ", "WROTE", "LISTED"] {
        assert!(root.contains(done), "the control, as root: {root}");
    }
}

/// A container outlives a crashed daemon, and so does its channel space: the next
/// daemon adopts the container, keeps the space it uses (only spaces nobody needs are
/// removed at start), and the channels work again through it.
#[test]
fn an_adopted_containers_channel_space_is_kept_and_works() {
    adopted_container_round_trips(false);
}

/// The same for a container launched in a warm slot, whose space was mounted in at the
/// hand-over rather than given to the engine.
#[test]
fn an_adopted_container_from_a_warm_slot_keeps_its_channel_space() {
    adopted_container_round_trips(true);
}

fn adopted_container_round_trips(warm: bool) {
    if let Some(why) = crate::docker::skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let pool = if warm { "warm: {size: 1}\n" } else { "" };
    let m = walled_echo(
        "docker",
        "/bulkhead/echo",
        &format!("{}{pool}", echo_mounts()),
    );
    let mut d = Daemon::start(&[("echo", &m)]);
    if warm {
        crate::warm::wait_ready_slots(&d, "echo", 1);
    }
    assert_eq!(launch(&d, "echo", "ad")["state"], "ready");
    let id = "session:ad:echo";
    assert_eq!(crate::warm::from_slot(&d, id), warm, "{}", d.daemon_log());
    round_trip(&d, id, "input", id, "output");
    let space = iox2_of(&d, id).space.expect("a space");
    d.kill9();
    d.spawn();
    d.wait_event("adopted", |e| e["instance"] == id && e["kind"] == "adopted");
    assert!(space.exists(), "the adopted container's space was kept");
    assert_eq!(iox2_of(&d, id).space.as_deref(), Some(space.as_path()));
    round_trip(&d, id, "input", id, "output");
}
