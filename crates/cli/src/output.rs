//! Rendering: a readable table or line by default, JSON (`-o json`) for scripts.
//!
//! Text output never writes a control character or a bidi override it was sent: every
//! line and table cell goes through [`escape`] (a workload's `STATUS=`, a failure reason,
//! a file name may hold an escape sequence or a U+202E). JSON is escaped by serde_json.

use std::io::IsTerminal;

use bulkhead_api::v1;

/// Whether to colour what goes to `stream`: only a terminal, and never when `NO_COLOR` is
/// set to anything but the empty string (<https://no-color.org>).
pub fn colour(stream: &impl IsTerminal) -> bool {
    colour_with(stream.is_terminal(), std::env::var_os("NO_COLOR"))
}

fn colour_with(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `println!` that returns the write error (`?`) instead of panicking: a closed stdout
/// (`| head`) ends the command, and `main` exits 0 without a word (see `exit::report`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` that returns the write error; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}
use serde_json::{json, Value};
pub(crate) use {out, outln};

use bulkhead_core::text::escape;
use bulkhead_core::time::rfc3339;

pub fn instance_json(i: &v1::Instance) -> Value {
    json!({
        "id": i.id,
        "workload": i.workload,
        "isolation": i.isolation,
        "namespace": i.namespace,
        "session": i.session,
        "driver": i.driver,
        "state": i.state,
        "pid": i.pid,
        "address": if i.address.is_empty() { Value::Null } else { json!(i.address) },
        "port": if i.port == 0 { Value::Null } else { json!(i.port) },
        "ready": i.ready,
        "restarts": i.restarts,
        "started_at": if i.started_at_ms == 0 { Value::Null } else { json!(rfc3339(i.started_at_ms)) },
        "started_at_ms": if i.started_at_ms == 0 { Value::Null } else { json!(i.started_at_ms) },
        "last_exit": i.last_exit.as_ref().map(|e| json!({
            "code": e.code,
            "signal": e.signal,
            "core_dumped": e.core_dumped,
        })),
        "failure": i.failure,
        "status_text": i.status_text,
        "breaker": i.breaker,
        "consecutive_failures": i.consecutive_failures,
        "leases": i.leases,
        "usage": i.usage.as_ref().map(|u| json!({
            "cpu_seconds": u.cpu_seconds,
            "memory_bytes": u.memory_bytes,
            "memory_peak_bytes": u.memory_peak_bytes,
            "memory_limit_bytes": u.memory_limit_bytes,
            "cpu_throttled_seconds": u.cpu_throttled_seconds,
            "pids": u.pids,
            "pids_limit": u.pids_limit,
            "pids_limit_hits": u.pids_limit_hits,
        })),
        "channels": i.channels.iter().map(|c| json!({
            "name": c.name,
            "direction": c.direction,
            "service": c.service,
            "max_payload": c.max_payload,
            "depth": c.depth,
        })).collect::<Vec<_>>(),
        "iox2_prefix": i.iox2_prefix,
        "iox2_root": i.iox2_root,
        "channel_space": i.channel_space,
    })
}

pub fn exit_text(e: &v1::ExitStatus) -> String {
    match (e.code, e.signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!(
            "{}{}",
            signal_name(s),
            if e.core_dumped { " (core dumped)" } else { "" }
        ),
        _ => "-".into(),
    }
}

/// `SIGTERM` for 15 (`SIG34` for a real-time signal; the number itself when it is no
/// signal at all). JSON keeps the number.
pub fn signal_name(n: i32) -> String {
    bulkhead_core::signal::Signal::from_number(n).map_or_else(|| n.to_string(), |s| s.name())
}

/// A size for people: `512B`, `1.5KiB`, `12.3MiB`, `2GiB` (JSON keeps the bytes).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // One decimal below 100 (12.3MiB), none above (512MiB); `.0` is dropped.
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    };
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

/// An age or a coarse duration for people: `3s`, `5m`, `2h`, `4d` (rounded down; JSON
/// keeps milliseconds).
pub fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A short exact duration (a grace, a back-off delay): `2s`, `1500ms`.
pub fn human_ms(ms: u64) -> String {
    bulkhead_core::duration::format(std::time::Duration::from_millis(ms))
}

/// Now, in milliseconds since the Unix epoch (for the AGE column).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long ago an instance started, for people; `-` before it started.
pub fn age(i: &v1::Instance, now_ms: u64) -> String {
    if i.started_at_ms == 0 {
        return "-".into();
    }
    human_age(now_ms.saturating_sub(i.started_at_ms))
}

pub fn instance_line(i: &v1::Instance) -> String {
    let mut s = format!("{} {}", i.id, i.state);
    if let Some(pid) = i.pid {
        s.push_str(&format!(" pid={pid}"));
    }
    if !i.address.is_empty() {
        s.push_str(&format!(" address={}", i.address));
    }
    if let Some(e) = &i.last_exit {
        s.push_str(&format!(" last_exit=\"{}\"", exit_text(e)));
    }
    if let Some(f) = &i.failure {
        s.push_str(&format!(" failure=\"{f}\""));
    }
    if let Some(st) = &i.status_text {
        s.push_str(&format!(" status=\"{st}\""));
    }
    if i.restarts > 0 {
        s.push_str(&format!(" restarts={}", i.restarts));
    }
    if !i.breaker.is_empty() && i.breaker != "closed" {
        s.push_str(&format!(" breaker={}", i.breaker));
    }
    if !i.leases.is_empty() {
        s.push_str(&format!(" leases={}", i.leases.join(",")));
    }
    if let Some(u) = &i.usage {
        s.push_str(&format!(
            " cpu={:.2}s mem={}",
            u.cpu_seconds,
            human_bytes(u.memory_bytes)
        ));
        if let Some(p) = u.memory_peak_bytes {
            s.push_str(&format!(" mem_peak={}", human_bytes(p)));
        }
        if let Some(l) = u.memory_limit_bytes {
            s.push_str(&format!(" mem_limit={}", human_bytes(l)));
        }
        if let Some(t) = u.cpu_throttled_seconds {
            s.push_str(&format!(" throttled={t:.2}s"));
        }
        s.push_str(&format!(" pids={}", u.pids));
        if let Some(l) = u.pids_limit {
            s.push_str(&format!("/{l}"));
        }
        if let Some(h) = u.pids_limit_hits.filter(|h| *h > 0) {
            s.push_str(&format!(" pids_limit_hits={h}"));
        }
    }
    escape(&s).into_owned()
}

/// The `list` table; `colour`: the STATE column coloured (see [`colour`]).
pub fn instance_table(list: &[v1::Instance], now_ms: u64, colour: bool) -> String {
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|i| {
            [
                i.id.clone(),
                i.state.clone(),
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if i.address.is_empty() {
                    "-".into()
                } else {
                    i.address.clone()
                },
                if i.ready { "yes".into() } else { "no".into() },
                i.restarts.to_string(),
                age(i, now_ms),
                i.last_exit
                    .as_ref()
                    .map(exit_text)
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    painted_table(
        &[
            "ID",
            "STATE",
            "PID",
            "ADDRESS",
            "READY",
            "RESTARTS",
            "AGE",
            "LAST EXIT",
        ],
        &rows,
        |col, cell| {
            if colour && col == 1 {
                state_colour(cell)
            } else {
                None
            }
        },
    )
}

/// A table with aligned columns; every cell [escaped](escape).
pub fn table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    painted_table(head, rows, |_, _| None)
}

/// [`table`], with the cells `paint(column, cell)` names wrapped in that SGR colour
/// (padding stays outside the escape, so columns stay aligned).
fn painted_table<const N: usize>(
    head: &[&str; N],
    rows: &[[String; N]],
    paint: impl Fn(usize, &str) -> Option<&'static str>,
) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape(c).into_owned()).collect())
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, body: bool, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(w[i] - c.chars().count());
                match paint(i, c).filter(|_| body) {
                    Some(sgr) => format!("\u{1b}[{sgr}m{c}\u{1b}[0m{pad}"),
                    None => format!("{c}{pad}"),
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(head.to_vec(), false, &mut out);
    for r in &rows {
        line(r.iter().map(String::as_str).collect(), true, &mut out);
    }
    out
}

/// The colour of a state in `list` on a terminal: green when ready, red when it failed
/// or crashed, yellow on the way (starting, stopping, restarting); none otherwise.
fn state_colour(state: &str) -> Option<&'static str> {
    match state {
        "ready" => Some("32"),
        "failed" | "crashed" => Some("31"),
        "starting" | "stopping" | "restarting" => Some("33"),
        _ => None,
    }
}

pub fn event_json(e: &v1::Event) -> Value {
    let mut v = json!({
        "id": e.id,
        "time": rfc3339(e.time_ms),
        "time_ms": e.time_ms,
        "instance": e.instance,
        "kind": e.kind,
    });
    let m = v.as_object_mut().expect("object");
    if let Some(p) = e.pid {
        m.insert("pid".into(), json!(p));
    }
    if let Some(c) = e.exit_code {
        m.insert("exit_code".into(), json!(c));
    }
    if let Some(s) = e.signal {
        m.insert("signal".into(), json!(s));
    }
    if let Some(c) = e.core_dumped {
        m.insert("core_dumped".into(), json!(c));
    }
    if let Some(r) = &e.reason {
        m.insert("reason".into(), json!(r));
    }
    if let Some(k) = &e.failure_kind {
        m.insert("failure_kind".into(), json!(k));
    }
    if let Some(g) = e.grace_ms {
        m.insert("grace_ms".into(), json!(g));
    }
    if let Some(a) = e.attempt {
        m.insert("attempt".into(), json!(a));
    }
    if let Some(d) = e.delay_ms {
        m.insert("delay_ms".into(), json!(d));
    }
    if let Some(f) = e.failures {
        m.insert("failures".into(), json!(f));
    }
    if let Some(l) = e.limit_bytes {
        m.insert("limit_bytes".into(), json!(l));
    }
    if !e.dependencies.is_empty() {
        m.insert("dependencies".into(), json!(e.dependencies));
    }
    if let Some(d) = &e.dependency {
        m.insert("dependency".into(), json!(d));
    }
    if let Some(c) = &e.channel {
        m.insert("channel".into(), json!(c));
    }
    v
}

/// `workloads --graph`: each workload no other depends on, with its dependencies below
/// it (`name (condition)`), as a tree; an invalid workload is marked and not expanded.
pub fn dependency_tree(list: &[v1::Workload]) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let by_name: BTreeMap<&str, &v1::Workload> =
        list.iter().map(|w| (w.name.as_str(), w)).collect();
    let needed: BTreeSet<&str> = list
        .iter()
        .flat_map(|w| w.depends_on.iter().map(|d| d.name.as_str()))
        .collect();
    fn walk(
        out: &mut String,
        by_name: &BTreeMap<&str, &v1::Workload>,
        name: &str,
        prefix: &str,
        path: &mut Vec<String>,
    ) {
        let Some(w) = by_name.get(name) else { return };
        let n = w.depends_on.len();
        for (i, d) in w.depends_on.iter().enumerate() {
            let last = i + 1 == n;
            let invalid = by_name.get(d.name.as_str()).is_none_or(|x| !x.valid);
            out.push_str(&format!(
                "{prefix}{} {} ({}){}\n",
                if last { "└─" } else { "├─" },
                d.name,
                d.condition,
                if invalid { " INVALID" } else { "" }
            ));
            // A cycle (which the daemon reports as invalid) is not followed round.
            if !invalid && !path.contains(&d.name) {
                path.push(d.name.clone());
                let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
                walk(out, by_name, &d.name, &deeper, path);
                path.pop();
            }
        }
    }
    let mut out = String::new();
    for w in list {
        if needed.contains(w.name.as_str()) && w.valid {
            continue;
        }
        out.push_str(&w.name);
        if !w.valid {
            out.push_str(" INVALID");
        }
        out.push('\n');
        walk(&mut out, &by_name, &w.name, "", &mut vec![w.name.clone()]);
    }
    bulkhead_core::text::escape_lines(out.trim_end()).into_owned()
}

pub fn event_line(e: &v1::Event) -> String {
    let mut s = format!("#{} {} {} {}", e.id, rfc3339(e.time_ms), e.instance, e.kind);
    if let Some(p) = e.pid {
        s.push_str(&format!(" pid={p}"));
    }
    if let Some(c) = e.exit_code {
        s.push_str(&format!(" exit_code={c}"));
    }
    if let Some(sig) = e.signal {
        s.push_str(&format!(" signal={}", signal_name(sig)));
    }
    if e.core_dumped == Some(true) {
        s.push_str(" core_dumped=true");
    }
    if let Some(g) = e.grace_ms {
        s.push_str(&format!(" grace={}", human_ms(g)));
    }
    if let Some(a) = e.attempt {
        s.push_str(&format!(" attempt={a}"));
    }
    if let Some(d) = e.delay_ms {
        s.push_str(&format!(" delay={}", human_ms(d)));
    }
    if let Some(f) = e.failures {
        s.push_str(&format!(" failures={f}"));
    }
    if let Some(l) = e.limit_bytes {
        s.push_str(&format!(" limit={}", human_bytes(l)));
    }
    if let Some(c) = &e.channel {
        s.push_str(&format!(" channel={c}"));
    }
    if !e.dependencies.is_empty() {
        s.push_str(&format!(" dependencies={}", e.dependencies.join(",")));
    }
    if let Some(d) = &e.dependency {
        s.push_str(&format!(" dependency={d}"));
    }
    if let Some(k) = &e.failure_kind {
        s.push_str(&format!(" failure_kind={k}"));
    }
    if let Some(r) = &e.reason {
        s.push_str(&format!(" reason=\"{r}\""));
    }
    escape(&s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hostile workload or manifest can put in a free-text field.
    const EVIL: &str = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nfake line\u{202e}exe.txt\u{9b}";

    /// Whether one printed line holds a raw unsafe character (a newline included).
    fn raw(line: &str) -> bool {
        line.chars().any(bulkhead_core::text::is_unsafe)
    }

    fn evil_instance() -> v1::Instance {
        v1::Instance {
            id: "session:s:w".into(),
            state: "failed".into(),
            failure: Some(EVIL.into()),
            status_text: Some(EVIL.into()),
            leases: vec![EVIL.into()],
            address: EVIL.into(),
            last_exit: Some(v1::ExitStatus {
                code: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Issue 11: `get`, `list` and `events` printed a workload's `STATUS=` and other free
    /// text raw: escape sequences and U+202E reached the terminal.
    #[test]
    fn free_text_reached_the_terminal_raw() {
        let line = instance_line(&evil_instance());
        assert!(!raw(&line), "{line:?}");
        assert!(
            line.contains("\\u{1b}]0;pwned") && line.contains("\\u{202e}"),
            "{line}"
        );
        let t = instance_table(&[evil_instance()], 0, false);
        assert_eq!(t.lines().count(), 2, "one header, one row: {t:?}");
        assert!(
            !t.chars()
                .any(|c| c != '\n' && bulkhead_core::text::is_unsafe(c)),
            "{t:?}"
        );
        let e = v1::Event {
            instance: "session:s:w".into(),
            kind: "launch_failed".into(),
            reason: Some(EVIL.into()),
            channel: Some(EVIL.into()),
            ..Default::default()
        };
        let l = event_line(&e);
        assert!(!raw(&l), "{l:?}");
        let t = table(&["NAME", "NOTES"], &[[EVIL.to_owned(), EVIL.to_owned()]]);
        assert_eq!(t.lines().count(), 2, "{t:?}");
        assert!(
            !t.chars()
                .any(|c| c != '\n' && bulkhead_core::text::is_unsafe(c)),
            "{t:?}"
        );
    }
}

#[cfg(test)]
mod human {
    use super::*;

    #[test]
    fn coloured_states_keep_the_columns_aligned() {
        let rows: Vec<v1::Instance> = ["ready", "crashed", "terminated"]
            .iter()
            .map(|st| v1::Instance {
                id: format!("session:s:{st}"),
                state: (*st).into(),
                ..Default::default()
            })
            .collect();
        let plain = instance_table(&rows, 0, false);
        assert!(!plain.contains('\u{1b}'), "{plain}");
        let painted = instance_table(&rows, 0, true);
        assert!(painted.contains("\u{1b}[32mready\u{1b}[0m"), "{painted:?}");
        assert!(
            painted.contains("\u{1b}[31mcrashed\u{1b}[0m"),
            "{painted:?}"
        );
        assert!(!painted.contains("\u{1b}[33m"), "{painted:?}");
        // Without the escapes, the coloured table is the plain one.
        let stripped = painted
            .replace("\u{1b}[32m", "")
            .replace("\u{1b}[31m", "")
            .replace("\u{1b}[0m", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_with(true, None));
        assert!(
            colour_with(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour_with(true, Some("1".into())));
        assert!(!colour_with(false, None));
    }

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1024), "1KiB");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(12_900_000), "12.3MiB");
        assert_eq!(human_bytes(512 << 20), "512MiB");
        assert_eq!(human_bytes(3 << 30), "3GiB");
        assert_eq!(human_bytes(u64::MAX), "16384PiB");
    }

    #[test]
    fn ages_in_the_largest_whole_unit() {
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(3_999), "3s");
        assert_eq!(human_age(59_999), "59s");
        assert_eq!(human_age(60_000), "1m");
        assert_eq!(human_age(5 * 60_000 + 59_000), "5m");
        assert_eq!(human_age(2 * 3_600_000 + 1), "2h");
        assert_eq!(human_age(4 * 86_400_000), "4d");
        let started = v1::Instance {
            started_at_ms: 1_000_000,
            ..Default::default()
        };
        assert_eq!(age(&started, 1_000_000 + 125_000), "2m");
        // A clock that went back shows 0s, not a panic or a huge age.
        assert_eq!(age(&started, 0), "0s");
        assert_eq!(age(&v1::Instance::default(), 1_000_000), "-");
    }

    #[test]
    fn signals_by_name_in_text() {
        let killed = v1::ExitStatus {
            signal: Some(9),
            ..Default::default()
        };
        assert_eq!(exit_text(&killed), "SIGKILL");
        let core = v1::ExitStatus {
            signal: Some(11),
            core_dumped: true,
            ..Default::default()
        };
        assert_eq!(exit_text(&core), "SIGSEGV (core dumped)");
        let e = v1::Event {
            instance: "shared:w".into(),
            kind: "terminating".into(),
            signal: Some(15),
            grace_ms: Some(2_500),
            ..Default::default()
        };
        let line = event_line(&e);
        assert!(line.ends_with("signal=SIGTERM grace=2500ms"), "{line}");
        assert_eq!(event_json(&e)["signal"], 15, "JSON keeps the number");
        assert_eq!(event_json(&e)["grace_ms"], 2_500);
    }

    #[test]
    fn table_has_an_age_column() {
        let i = v1::Instance {
            id: "shared:w".into(),
            state: "ready".into(),
            started_at_ms: 10_000,
            ..Default::default()
        };
        let t = instance_table(&[i], 10_000 + 3 * 3_600_000, false);
        let mut lines = t.lines();
        let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let at = head.iter().position(|h| *h == "AGE").expect("AGE column");
        assert_eq!(row[at], "3h", "{t}");
    }
}
