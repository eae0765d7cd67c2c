//! Helpers shared by the fault suites: the long-form switch, finding a test's processes by
//! a marker in their environment, and invariant checks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Daemon, DEADLINE};

/// Whether the long form was asked for (`BULKHEAD_FAULTS_LONG=1`).
pub fn long() -> bool {
    std::env::var("BULKHEAD_FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// `bounded` normally, `full` in the long form.
pub fn scale(bounded: usize, full: usize) -> usize {
    if long() {
        full
    } else {
        bounded
    }
}

/// A marker unique to one test, put into its workloads' environment as `FAULT_MARK`.
pub fn marker(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), crate::harness::now_ms())
}

/// Live processes whose environment carries `FAULT_MARK=<mark>`, with their
/// `BULKHEAD_INSTANCE`.
pub fn marked(mark: &str) -> Vec<(u32, String)> {
    let want = format!("FAULT_MARK={mark}");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.contains(&want.as_bytes()) {
            continue;
        }
        if !crate::harness::alive(pid) {
            continue;
        }
        let inst = vars
            .iter()
            .find_map(|v| v.strip_prefix(b"BULKHEAD_INSTANCE="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        out.push((pid, inst));
    }
    out
}

/// Marked processes per instance id (main processes only: those whose parent is not
/// itself marked, i.e. not a shell's child).
pub fn per_instance(mark: &str) -> HashMap<String, Vec<u32>> {
    let all = marked(mark);
    let pids: Vec<u32> = all.iter().map(|(p, _)| *p).collect();
    let mut m: HashMap<String, Vec<u32>> = HashMap::new();
    for (pid, inst) in all {
        let parent_marked = bulkhead_driver::sys::read_stat(pid)
            .map(|s| pids.contains(&s.ppid))
            .unwrap_or(false);
        if !parent_marked {
            m.entry(inst).or_default().push(pid);
        }
    }
    // The scan is not a snapshot: a run that exited early in it and its successor found
    // later would look like two processes at once. Those still alive after the scan were
    // alive together (a process cannot come back), so keep only them.
    for pids in m.values_mut() {
        pids.retain(|p| crate::harness::alive(*p));
    }
    m.retain(|_, pids| !pids.is_empty());
    m
}

/// Event ids have no gap and no duplicate. History holds the newest 10,000 events, so
/// after many events it starts later than 1; ids must still run one by one.
pub fn assert_gapless(events: &[Value]) {
    let got: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    let first = got.first().copied().unwrap_or(1);
    if got.len() < 10_000 {
        assert_eq!(first, 1, "history does not start at event 1");
    }
    for (i, w) in got.windows(2).enumerate() {
        assert_eq!(
            w[1],
            w[0] + 1,
            "event ids jump from {} to {} at index {i}",
            w[0],
            w[1]
        );
    }
}

/// Waits until `f` holds, failing the test after the harness deadline.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The instances `list` shows, by id.
pub fn listed(d: &Daemon) -> HashMap<String, Value> {
    let v = d.json(&["list", "-o", "json"]);
    let arr = v
        .as_array()
        .cloned()
        .or_else(|| v["instances"].as_array().cloned())
        .unwrap_or_default();
    arr.into_iter()
        .map(|i| (i["id"].as_str().unwrap_or_default().to_owned(), i))
        .collect()
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Zombie children of a process.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    bulkhead_driver::sys::zombie_children(pid)
}

/// p50 / p99 / max of a set of samples, in milliseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99), at(1.0))
}

/// The open-file limit the long form gives the daemon when it may.
const NOFILE: libc::rlim_t = 65_536;

/// Raises this process's open-file limit (soft and hard) to [`NOFILE`] when it may
/// (CAP_SYS_RESOURCE); the daemon started next inherits it.
pub fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives on this stack.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// How many of `wanted` live instances the daemon's open-file limit holds: the daemon keeps
/// one descriptor per keeper instance (its pidfd) and raises its soft limit to the hard
/// one it inherited from this process; keepers shard past their own limit. (Before the
/// shards, at the hard limit of 20,000 here, launches failed from ~6,250 live instances
/// on.) Fewer than wanted is printed, with the reason.
pub fn sleepers_that_fit(wanted: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return wanted;
    }
    let hard = lim.rlim_max;
    // The daemon holds one descriptor per instance (keepers shard past their own limit),
    // plus room for the bounded burst and its own.
    let fit = usize::try_from(hard)
        .unwrap_or(usize::MAX)
        .saturating_sub(2048);
    if fit < wanted {
        println!(
            "{fit} live sleepers instead of {wanted}: the open-file hard limit is \
             {hard} and this process cannot raise it (no CAP_SYS_RESOURCE); the daemon holds \
             one per instance"
        );
        return fit;
    }
    wanted
}
