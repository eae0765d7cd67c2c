//! What `bulkhead top` shows and how keys change it: pure state, no I/O, no terminal.
//! The runtime (`super`) feeds it instances, events, usage and log lines, and carries
//! out the [`Command`]s its keys return.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bulkhead_api::v1;

/// Events kept per instance for the detail pane, and for the daemon's event pane.
pub const EVENTS_PER_INSTANCE: usize = 20;
pub const EVENTS_KEPT: usize = 500;
/// Log lines kept for the log pane.
pub const LOG_LINES_KEPT: usize = 5_000;

/// A column the table can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Id,
    Workload,
    Driver,
    State,
    Pid,
    Restarts,
    Cpu,
    Memory,
    Age,
}

impl Column {
    pub const ALL: [Column; 9] = [
        Column::Id,
        Column::Workload,
        Column::Driver,
        Column::State,
        Column::Pid,
        Column::Restarts,
        Column::Cpu,
        Column::Memory,
        Column::Age,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Column::Id => "id",
            Column::Workload => "workload",
            Column::Driver => "driver",
            Column::State => "state",
            Column::Pid => "pid",
            Column::Restarts => "restarts",
            Column::Cpu => "cpu",
            Column::Memory => "memory",
            Column::Age => "age",
        }
    }

    fn next(self) -> Column {
        let i = Column::ALL.iter().position(|c| *c == self).unwrap_or(0);
        Column::ALL[(i + 1) % Column::ALL.len()]
    }
}

/// An action that changes an instance, asked for and waiting for `y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Terminate(String),
    Restart(String),
    EndSession(String),
}

impl Action {
    pub fn question(&self) -> String {
        match self {
            Action::Terminate(id) => format!("terminate {id}?"),
            Action::Restart(id) => format!("restart {id}?"),
            Action::EndSession(s) => format!("end session {s} (terminate all its instances)?"),
        }
    }
}

/// Where the keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Table,
    /// Typing the table's filter.
    Filter,
    Detail,
    Logs,
    /// Typing the log pane's search.
    LogSearch,
    Events,
    Help,
    /// Typing `WORKLOAD [ns:NS | session:SID]` to launch.
    Launch,
    Confirm(Action),
}

/// What the runtime must do for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    Terminate(String),
    Restart(String),
    EndSession(String),
    /// Launch `workload` for the namespace or session given.
    Launch {
        workload: String,
        namespace: Option<String>,
        session: Option<String>,
    },
    /// Follow this instance's log (replacing any other).
    FollowLogs(String),
    /// Read the manifest this instance's current run was started with (detail pane).
    FetchSpec(String),
    /// Read the workloads (launch prompt).
    FetchWorkloads,
    StopLogs,
}

/// A key, as the model understands it (the runtime maps the terminal's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    /// Ctrl-C.
    Interrupt,
}

/// One instance row.
#[derive(Debug, Clone)]
pub struct Row {
    pub inst: v1::Instance,
    /// CPU use between the last two usage readings, in cores (1.0 = one core).
    pub cpu: Option<f64>,
    /// The last reading: (cpu seconds, when in ms).
    last_cpu: Option<(f64, u64)>,
}

#[derive(Debug)]
pub struct Model {
    rows: BTreeMap<String, Row>,
    /// Ids of `rows` that pass the filter, in the sort order.
    visible: Vec<String>,
    events: HashMap<String, VecDeque<v1::Event>>,
    pub all_events: VecDeque<v1::Event>,
    pub filter: String,
    pub sort: Column,
    pub descending: bool,
    /// Index into `visible`.
    pub selected: usize,
    pub mode: Mode,
    /// The instance whose log the log pane shows, and its lines.
    pub logs_of: Option<String>,
    pub logs: VecDeque<String>,
    pub log_search: String,
    /// How far the log pane is scrolled up from its end (0: following).
    pub log_scroll: usize,
    /// Text typed for a launch.
    pub input: String,
    /// A one-line message: what an action did, or why it failed.
    pub status: Option<String>,
    /// Rows the table has room for (set by the view), for paging.
    pub page: usize,
    /// The detail pane's manifest: (instance, its lines).
    pub spec: Option<(String, Vec<String>)>,
    /// The workloads that can be launched (name, description), for the launch prompt.
    pub workloads: Vec<(String, String)>,
    /// Events changed rows since the last filter and sort.
    stale: bool,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            rows: BTreeMap::new(),
            visible: Vec::new(),
            events: HashMap::new(),
            all_events: VecDeque::new(),
            filter: String::new(),
            sort: Column::Id,
            descending: false,
            selected: 0,
            mode: Mode::Table,
            logs_of: None,
            logs: VecDeque::new(),
            log_search: String::new(),
            log_scroll: 0,
            input: String::new(),
            status: None,
            page: 20,
            spec: None,
            workloads: Vec::new(),
            stale: false,
        }
    }
}

impl Model {
    /// Replaces every row with `list` (a full listing), keeping the CPU readings.
    pub fn set_all(&mut self, list: Vec<v1::Instance>, now_ms: u64) {
        let mut old = std::mem::take(&mut self.rows);
        for inst in list {
            let prev = old.remove(&inst.id);
            self.put_row(inst, prev, now_ms);
        }
        self.refresh();
    }

    /// One instance as read now (`get`); `None` when it is gone from the daemon.
    pub fn update(&mut self, id: &str, inst: Option<v1::Instance>, now_ms: u64) {
        match inst {
            Some(i) => {
                let prev = self.rows.remove(id);
                self.put_row(i, prev, now_ms);
            }
            None => {
                self.rows.remove(id);
            }
        }
        // Sorted again before the next frame (`settle`).
        self.stale = true;
    }

    fn put_row(&mut self, inst: v1::Instance, prev: Option<Row>, now_ms: u64) {
        let reading = inst.usage.as_ref().map(|u| (u.cpu_seconds, now_ms));
        let (cpu, last_cpu) = match (prev, reading) {
            (Some(p), Some((secs, at))) => match p.last_cpu {
                Some((psecs, pat)) if at > pat && secs >= psecs => (
                    Some((secs - psecs) / ((at - pat) as f64 / 1000.0)),
                    Some((secs, at)),
                ),
                // The same reading again (a `get` right after a listing): keep the rate.
                Some((_, pat)) if at <= pat => (p.cpu, p.last_cpu),
                _ => (None, Some((secs, at))),
            },
            (Some(p), None) => (None, p.last_cpu.filter(|_| inst.usage.is_some())),
            (None, r) => (None, r),
        };
        self.rows.insert(
            inst.id.clone(),
            Row {
                inst,
                cpu,
                last_cpu,
            },
        );
    }

    /// An event from the daemon: applied to its row at once (a row is made for a new
    /// instance), so that the table and its counts follow the stream without reading
    /// anything; kept for the panes. The runtime reads the rows on screen again for what
    /// events do not carry (usage, failure details, address).
    pub fn event(&mut self, e: v1::Event) {
        self.apply(&e);
        let q = self.events.entry(e.instance.clone()).or_default();
        q.push_back(e.clone());
        while q.len() > EVENTS_PER_INSTANCE {
            q.pop_front();
        }
        self.all_events.push_back(e);
        while self.all_events.len() > EVENTS_KEPT {
            self.all_events.pop_front();
        }
    }

    fn apply(&mut self, e: &v1::Event) {
        let row = match self.rows.get_mut(&e.instance) {
            Some(r) => r,
            None => {
                if e.kind == "channel_peer_dead" {
                    return;
                }
                let Ok((_, key)) = bulkhead_core::key::InstanceId::parse(&e.instance) else {
                    return;
                };
                self.rows.insert(
                    e.instance.clone(),
                    Row {
                        inst: v1::Instance {
                            id: e.instance.clone(),
                            workload: key.workload().to_owned(),
                            isolation: key.isolation().as_str().to_owned(),
                            namespace: key.namespace().map(str::to_owned),
                            session: key.session().map(str::to_owned),
                            state: "starting".into(),
                            breaker: "closed".into(),
                            ..Default::default()
                        },
                        cpu: None,
                        last_cpu: None,
                    },
                );
                self.rows.get_mut(&e.instance).expect("just inserted")
            }
        };
        let i = &mut row.inst;
        let state = |s: &str, i: &mut v1::Instance| {
            i.state = s.to_owned();
            if s != "ready" {
                i.ready = false;
            }
        };
        match e.kind.as_str() {
            "launched" => {
                state("starting", i);
                i.pid = None;
                i.restarts = 0;
                i.failure = None;
            }
            "started" => {
                state("starting", i);
                i.pid = e.pid;
                i.started_at_ms = e.time_ms;
            }
            "ready" => {
                i.state = "ready".into();
                i.ready = true;
            }
            "adopted" => {
                i.state = "ready".into();
                i.ready = true;
                i.pid = e.pid.or(i.pid);
            }
            "unhealthy" => i.ready = false,
            "launch_failed" => {
                state("failed", i);
                i.failure = e.reason.clone();
            }
            "exited" | "crashed" | "oom_killed" => {
                state(
                    if e.kind == "exited" {
                        "exited"
                    } else {
                        "crashed"
                    },
                    i,
                );
                i.last_exit = Some(v1::ExitStatus {
                    code: e.exit_code,
                    signal: e.signal,
                    core_dumped: e.core_dumped.unwrap_or(false),
                });
            }
            "terminating" => state("stopping", i),
            "terminated" => {
                state("terminated", i);
                i.pid = None;
            }
            "restarting" => {
                state("restarting", i);
                i.pid = None;
                i.restarts += 1;
            }
            "breaker_open" => i.breaker = "open".into(),
            "breaker_half_open" => i.breaker = "half_open".into(),
            "breaker_closed" => i.breaker = "closed".into(),
            "liveness_failed" | "watchdog_timeout" | "lost" => i.failure = e.reason.clone(),
            _ => {}
        }
        // Re-sorted and re-filtered by the runtime once a batch is applied.
        self.stale = true;
    }

    /// Filters and sorts again if events changed rows since the last time.
    pub fn settle(&mut self) {
        if std::mem::take(&mut self.stale) {
            self.refresh();
        }
    }

    pub fn events_of(&self, id: &str) -> impl Iterator<Item = &v1::Event> {
        self.events.get(id).into_iter().flatten()
    }

    /// A line of the followed log (lines of another instance are dropped).
    pub fn log_line(&mut self, id: &str, line: String) {
        if self.logs_of.as_deref() != Some(id) {
            return;
        }
        self.logs.push_back(line);
        while self.logs.len() > LOG_LINES_KEPT {
            self.logs.pop_front();
        }
    }

    /// The log lines the pane shows: those matching the search (all without one).
    pub fn shown_logs(&self) -> Vec<&str> {
        let needle = self.log_search.to_lowercase();
        self.logs
            .iter()
            .filter(|l| needle.is_empty() || l.to_lowercase().contains(&needle))
            .map(String::as_str)
            .collect()
    }

    pub fn total(&self) -> usize {
        self.rows.len()
    }

    /// How many instances are in each state, in the states' order.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let mut n: BTreeMap<usize, usize> = BTreeMap::new();
        for r in self.rows.values() {
            *n.entry(state_rank(&r.inst.state)).or_default() += 1;
        }
        n.into_iter()
            .map(|(rank, c)| (STATES.get(rank).copied().unwrap_or("other"), c))
            .collect()
    }

    /// The rows that pass the filter, in order.
    #[cfg(test)]
    pub fn visible(&self) -> impl Iterator<Item = &Row> {
        self.visible.iter().filter_map(|id| self.rows.get(id))
    }

    pub fn visible_len(&self) -> usize {
        self.visible.len()
    }

    /// The rows from `start`, at most `n` (what the table draws: the view never touches
    /// the rows it does not show).
    pub fn window(&self, start: usize, n: usize) -> impl Iterator<Item = &Row> {
        // A row removed since the last sort (`update` with `None`) is skipped, not
        // looked up: the order is settled before the next frame.
        self.visible
            .iter()
            .skip(start)
            .take(n)
            .filter_map(|id| self.rows.get(id))
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.visible
            .get(self.selected)
            .and_then(|id| self.rows.get(id))
    }

    /// The ids of the rows from `start`, at most `n`: those whose usage the runtime reads.
    pub fn window_ids(&self, start: usize, n: usize) -> Vec<String> {
        self.visible.iter().skip(start).take(n).cloned().collect()
    }

    /// Filters and sorts again, keeping the selected instance selected.
    pub fn refresh(&mut self) {
        let keep = self.visible.get(self.selected).cloned();
        let words: Vec<String> = self
            .filter
            .split_whitespace()
            .map(str::to_lowercase)
            .collect();
        let mut v: Vec<&Row> = self
            .rows
            .values()
            .filter(|r| words.iter().all(|w| matches(&r.inst, w)))
            .collect();
        let now = crate::output::now_ms();
        v.sort_by(|a, b| {
            let o = compare(self.sort, a, b, now);
            let o = if self.descending { o.reverse() } else { o };
            o.then_with(|| a.inst.id.cmp(&b.inst.id))
        });
        self.visible = v.into_iter().map(|r| r.inst.id.clone()).collect();
        self.selected = keep
            .and_then(|id| self.visible.iter().position(|v| *v == id))
            .unwrap_or(self.selected)
            .min(self.visible.len().saturating_sub(1));
    }

    /// Applies a key; returns what the runtime must do.
    pub fn key(&mut self, k: Key) -> Vec<Command> {
        if k == Key::Interrupt {
            return vec![Command::Quit];
        }
        // Keys act on the order shown once what arrived since is applied.
        self.settle();
        match self.mode.clone() {
            Mode::Table => self.table_key(k),
            Mode::Filter => {
                match k {
                    Key::Enter => self.mode = Mode::Table,
                    Key::Esc => {
                        self.filter.clear();
                        self.mode = Mode::Table;
                    }
                    Key::Backspace => {
                        self.filter.pop();
                    }
                    Key::Char(c) => self.filter.push(c),
                    _ => return self.table_key(k),
                }
                self.refresh();
                vec![]
            }
            Mode::LogSearch => {
                match k {
                    Key::Enter => self.mode = Mode::Logs,
                    Key::Esc => {
                        self.log_search.clear();
                        self.mode = Mode::Logs;
                    }
                    Key::Backspace => {
                        self.log_search.pop();
                    }
                    Key::Char(c) => self.log_search.push(c),
                    _ => {}
                }
                vec![]
            }
            Mode::Launch => {
                match k {
                    Key::Esc => {
                        self.input.clear();
                        self.mode = Mode::Table;
                    }
                    Key::Backspace => {
                        self.input.pop();
                    }
                    Key::Char('\t') => self.complete_workload(),
                    Key::Char(c) => self.input.push(c),
                    Key::Enter => {
                        let text = std::mem::take(&mut self.input);
                        self.mode = Mode::Table;
                        return match parse_launch(&text) {
                            Ok(c) => vec![c],
                            Err(e) => {
                                self.status = Some(e);
                                vec![]
                            }
                        };
                    }
                    _ => {}
                }
                vec![]
            }
            Mode::Confirm(action) => {
                self.mode = Mode::Table;
                match k {
                    Key::Char('y') | Key::Char('Y') => vec![match action {
                        Action::Terminate(id) => Command::Terminate(id),
                        Action::Restart(id) => Command::Restart(id),
                        Action::EndSession(s) => Command::EndSession(s),
                    }],
                    _ => {
                        self.status = Some("cancelled".into());
                        vec![]
                    }
                }
            }
            Mode::Logs => match k {
                Key::Esc | Key::Char('q') => {
                    self.mode = Mode::Table;
                    self.logs_of = None;
                    self.logs.clear();
                    self.log_search.clear();
                    vec![Command::StopLogs]
                }
                Key::Char('/') => {
                    self.mode = Mode::LogSearch;
                    vec![]
                }
                Key::Up | Key::Char('k') => {
                    self.log_scroll = self.log_scroll.saturating_add(1);
                    vec![]
                }
                Key::Down | Key::Char('j') => {
                    self.log_scroll = self.log_scroll.saturating_sub(1);
                    vec![]
                }
                Key::PageUp => {
                    self.log_scroll = self.log_scroll.saturating_add(self.page.max(1));
                    vec![]
                }
                Key::PageDown => {
                    self.log_scroll = self.log_scroll.saturating_sub(self.page.max(1));
                    vec![]
                }
                Key::End | Key::Char('G') | Key::Char('f') => {
                    self.log_scroll = 0;
                    vec![]
                }
                _ => vec![],
            },
            Mode::Detail | Mode::Events | Mode::Help => {
                match k {
                    Key::Esc | Key::Char('q') | Key::Enter | Key::Char('?') => {
                        self.mode = Mode::Table
                    }
                    // The actions work from the detail pane too.
                    Key::Char('t' | 'r' | 'l') if self.mode == Mode::Detail => {
                        self.mode = Mode::Table;
                        return self.table_key(k);
                    }
                    _ => {}
                }
                vec![]
            }
        }
    }

    /// The workloads the launch prompt offers: those whose name starts with what is typed.
    pub fn workload_choices(&self) -> Vec<&(String, String)> {
        let typed = self.input.split_whitespace().next().unwrap_or("");
        self.workloads
            .iter()
            .filter(|(n, _)| n.starts_with(typed))
            .collect()
    }

    /// Tab in the launch prompt: completes the workload name when one choice is left.
    fn complete_workload(&mut self) {
        if self.input.contains(' ') {
            return;
        }
        if let [(name, _)] = self.workload_choices()[..] {
            self.input = format!("{name} ");
        }
    }

    fn table_key(&mut self, k: Key) -> Vec<Command> {
        let last = self.visible.len().saturating_sub(1);
        let selected = self.selected_row().map(|r| r.inst.id.clone());
        match k {
            Key::Char('q') | Key::Esc if self.mode == Mode::Table => return vec![Command::Quit],
            Key::Up | Key::Char('k') => self.selected = self.selected.saturating_sub(1),
            Key::Down | Key::Char('j') => self.selected = (self.selected + 1).min(last),
            Key::PageUp => self.selected = self.selected.saturating_sub(self.page.max(1)),
            Key::PageDown => self.selected = (self.selected + self.page.max(1)).min(last),
            Key::Home | Key::Char('g') => self.selected = 0,
            Key::End | Key::Char('G') => self.selected = last,
            Key::Char('/') => self.mode = Mode::Filter,
            Key::Char('s') => {
                self.sort = self.sort.next();
                self.refresh();
            }
            Key::Char('S') => {
                self.descending = !self.descending;
                self.refresh();
            }
            Key::Char('?') => self.mode = Mode::Help,
            Key::Char('e') => self.mode = Mode::Events,
            Key::Char('n') => {
                self.input.clear();
                self.mode = Mode::Launch;
                return vec![Command::FetchWorkloads];
            }
            Key::Enter => {
                if let Some(id) = selected {
                    self.mode = Mode::Detail;
                    if self.spec.as_ref().is_none_or(|(s, _)| *s != id) {
                        self.spec = None;
                    }
                    return vec![Command::FetchSpec(id)];
                }
            }
            Key::Char('l') => {
                if let Some(id) = selected {
                    self.mode = Mode::Logs;
                    self.logs.clear();
                    self.log_scroll = 0;
                    self.logs_of = Some(id.clone());
                    return vec![Command::FollowLogs(id)];
                }
            }
            Key::Char('t') => {
                if let Some(id) = selected {
                    self.mode = Mode::Confirm(Action::Terminate(id));
                }
            }
            Key::Char('r') => {
                if let Some(id) = selected {
                    self.mode = Mode::Confirm(Action::Restart(id));
                }
            }
            Key::Char('x') => match self.selected_row().and_then(|r| r.inst.session.clone()) {
                Some(s) => self.mode = Mode::Confirm(Action::EndSession(s)),
                None => self.status = Some("the selected instance has no session".into()),
            },
            _ => {}
        }
        vec![]
    }
}

/// The states in the order the header counts them.
pub const STATES: [&str; 8] = [
    "ready",
    "starting",
    "restarting",
    "stopping",
    "failed",
    "crashed",
    "exited",
    "terminated",
];

fn state_rank(s: &str) -> usize {
    STATES.iter().position(|x| *x == s).unwrap_or(STATES.len())
}

/// Whether the filter word `w` (lower case) matches the instance: a part of its id,
/// workload, namespace, session or state.
fn matches(i: &v1::Instance, w: &str) -> bool {
    [
        Some(i.id.as_str()),
        Some(i.workload.as_str()),
        i.namespace.as_deref(),
        i.session.as_deref(),
        Some(i.state.as_str()),
    ]
    .into_iter()
    .flatten()
    .any(|f| f.to_lowercase().contains(w))
}

fn compare(c: Column, a: &Row, b: &Row, now: u64) -> std::cmp::Ordering {
    let (x, y) = (&a.inst, &b.inst);
    let mem = |r: &Row| r.inst.usage.as_ref().map_or(0, |u| u.memory_bytes);
    let age = |i: &v1::Instance| {
        if i.started_at_ms == 0 {
            0
        } else {
            now.saturating_sub(i.started_at_ms)
        }
    };
    match c {
        Column::Id => x.id.cmp(&y.id),
        Column::Workload => x.workload.cmp(&y.workload),
        Column::Driver => x.driver.cmp(&y.driver),
        Column::State => state_rank(&x.state).cmp(&state_rank(&y.state)),
        Column::Pid => x.pid.cmp(&y.pid),
        Column::Restarts => x.restarts.cmp(&y.restarts),
        Column::Cpu => a.cpu.unwrap_or(-1.0).total_cmp(&b.cpu.unwrap_or(-1.0)),
        Column::Memory => mem(a).cmp(&mem(b)),
        Column::Age => age(x).cmp(&age(y)),
    }
}

/// `WORKLOAD`, `WORKLOAD ns:NS` or `WORKLOAD session:SID`.
fn parse_launch(text: &str) -> Result<Command, String> {
    let mut words = text.split_whitespace();
    let Some(workload) = words.next() else {
        return Err("launch: type a workload name".into());
    };
    let (mut namespace, mut session) = (None, None);
    for w in words {
        if let Some(ns) = w.strip_prefix("ns:") {
            namespace = Some(ns.to_owned());
        } else if let Some(s) = w.strip_prefix("session:") {
            session = Some(s.to_owned());
        } else {
            return Err(format!(
                "launch: {w:?} is neither ns:NAMESPACE nor session:SESSION"
            ));
        }
    }
    Ok(Command::Launch {
        workload: workload.to_owned(),
        namespace,
        session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, workload: &str, state: &str) -> v1::Instance {
        v1::Instance {
            id: id.into(),
            workload: workload.into(),
            state: state.into(),
            session: id
                .strip_prefix("session:")
                .map(|s| s.split(':').next().unwrap().into()),
            ..Default::default()
        }
    }

    fn keys(m: &mut Model, text: &str) -> Vec<Command> {
        text.chars().flat_map(|c| m.key(Key::Char(c))).collect()
    }

    #[test]
    fn filtering_by_typing_keeps_matching_rows_and_the_selection() {
        let mut m = Model::default();
        m.set_all(
            vec![
                inst("ns:a:web", "web", "ready"),
                inst("ns:b:web", "web", "failed"),
                inst("ns:a:db", "db", "ready"),
            ],
            0,
        );
        assert_eq!(m.visible_len(), 3);
        m.key(Key::Down);
        assert_eq!(m.selected_row().unwrap().inst.id, "ns:a:web");
        keys(&mut m, "/web");
        assert_eq!(m.visible_len(), 2);
        assert_eq!(m.selected_row().unwrap().inst.id, "ns:a:web");
        // Words combine: web and failed.
        keys(&mut m, " fail");
        assert_eq!(m.visible_len(), 1);
        assert_eq!(m.selected_row().unwrap().inst.id, "ns:b:web");
        m.key(Key::Esc);
        assert_eq!(m.visible_len(), 3);
        assert_eq!(m.mode, Mode::Table);
    }

    #[test]
    fn sorting_cycles_columns_and_reverses() {
        let mut m = Model::default();
        let mut a = inst("ns:a:x", "x", "ready");
        a.restarts = 5;
        let mut b = inst("ns:b:x", "x", "starting");
        b.restarts = 1;
        m.set_all(vec![a, b], 0);
        while m.sort != Column::Restarts {
            m.key(Key::Char('s'));
        }
        let order: Vec<_> = m.visible().map(|r| r.inst.id.clone()).collect();
        assert_eq!(order, ["ns:b:x", "ns:a:x"]);
        m.key(Key::Char('S'));
        let order: Vec<_> = m.visible().map(|r| r.inst.id.clone()).collect();
        assert_eq!(order, ["ns:a:x", "ns:b:x"]);
    }

    #[test]
    fn actions_ask_first_and_only_y_confirms() {
        let mut m = Model::default();
        m.set_all(vec![inst("session:s1:web", "web", "ready")], 0);
        assert!(m.key(Key::Char('t')).is_empty());
        assert_eq!(
            m.mode,
            Mode::Confirm(Action::Terminate("session:s1:web".into()))
        );
        assert!(m.key(Key::Char('n')).is_empty());
        assert_eq!(m.status.as_deref(), Some("cancelled"));
        m.key(Key::Char('r'));
        assert_eq!(
            m.key(Key::Char('y')),
            [Command::Restart("session:s1:web".into())]
        );
        m.key(Key::Char('x'));
        assert_eq!(m.key(Key::Char('y')), [Command::EndSession("s1".into())]);
        assert_eq!(m.key(Key::Char('q')), [Command::Quit]);
    }

    #[test]
    fn launching_from_the_view_parses_its_key() {
        let mut m = Model::default();
        m.key(Key::Char('n'));
        keys(&mut m, "web session:s9");
        assert_eq!(
            m.key(Key::Enter),
            [Command::Launch {
                workload: "web".into(),
                namespace: None,
                session: Some("s9".into())
            }]
        );
        m.key(Key::Char('n'));
        keys(&mut m, "web nope");
        assert!(m.key(Key::Enter).is_empty());
        assert!(m.status.as_deref().unwrap().contains("nope"));
    }

    #[test]
    fn the_launch_prompt_offers_the_workloads_and_completes_one() {
        let mut m = Model {
            workloads: vec![
                ("web".into(), "the site".into()),
                ("worker".into(), String::new()),
                ("db".into(), String::new()),
            ],
            ..Default::default()
        };
        m.key(Key::Char('n'));
        keys(&mut m, "w");
        assert_eq!(m.workload_choices().len(), 2);
        keys(&mut m, "e");
        m.key(Key::Char('\t'));
        assert_eq!(m.input, "web ");
        keys(&mut m, "ns:a");
        assert_eq!(
            m.key(Key::Enter),
            [Command::Launch {
                workload: "web".into(),
                namespace: Some("a".into()),
                session: None
            }]
        );
    }

    #[test]
    fn the_log_pane_follows_one_instance_and_searches() {
        let mut m = Model::default();
        m.set_all(vec![inst("ns:a:web", "web", "ready")], 0);
        assert_eq!(
            m.key(Key::Char('l')),
            [Command::FollowLogs("ns:a:web".into())]
        );
        m.log_line("ns:a:web", "hello".into());
        m.log_line("ns:b:other", "not mine".into());
        m.log_line("ns:a:web", "world".into());
        assert_eq!(m.shown_logs(), ["hello", "world"]);
        keys(&mut m, "/WOR");
        m.key(Key::Enter);
        assert_eq!(m.shown_logs(), ["world"]);
        assert_eq!(m.key(Key::Esc), [Command::StopLogs]);
        assert_eq!(m.mode, Mode::Table);
    }

    fn ev(id: &str, kind: &str) -> v1::Event {
        v1::Event {
            instance: id.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn events_alone_keep_the_rows_and_counts() {
        let mut m = Model::default();
        for k in ["launched", "started", "ready"] {
            m.event(ev("session:s1:web", k));
        }
        m.event(ev("ns:a:db", "launched"));
        m.settle();
        assert_eq!(m.total(), 2);
        assert_eq!(m.counts(), [("ready", 1), ("starting", 1)]);
        let web = m.visible().find(|r| r.inst.id == "session:s1:web").unwrap();
        assert_eq!(web.inst.session.as_deref(), Some("s1"));
        assert!(web.inst.ready);
        for k in ["exited", "restarting"] {
            m.event(ev("session:s1:web", k));
        }
        m.event(ev("ns:a:db", "launch_failed"));
        m.settle();
        assert_eq!(m.counts(), [("restarting", 1), ("failed", 1)]);
        for k in ["terminating", "terminated"] {
            m.event(ev("session:s1:web", k));
        }
        m.settle();
        assert_eq!(m.counts(), [("failed", 1), ("terminated", 1)]);
    }

    #[test]
    fn a_row_removed_before_the_next_sort_is_skipped_not_looked_up() {
        let mut m = Model::default();
        m.set_all(
            vec![inst("ns:a:x", "x", "ready"), inst("ns:b:x", "x", "ready")],
            0,
        );
        m.key(Key::Down);
        m.update("ns:b:x", None, 1);
        // Before any frame settled the order: nothing panics.
        assert!(m.selected_row().is_none());
        assert_eq!(m.window(0, 10).count(), 1);
        assert_eq!(m.key(Key::Char('q')), [Command::Quit]);
        assert_eq!(m.selected_row().unwrap().inst.id, "ns:a:x");
    }

    #[test]
    fn cpu_is_the_rate_between_two_readings() {
        let mut m = Model::default();
        let mut i = inst("ns:a:web", "web", "ready");
        i.usage = Some(v1::Usage {
            cpu_seconds: 1.0,
            ..Default::default()
        });
        m.update("ns:a:web", Some(i.clone()), 1_000);
        m.settle();
        assert_eq!(m.selected_row().unwrap().cpu, None);
        i.usage.as_mut().unwrap().cpu_seconds = 1.5;
        m.update("ns:a:web", Some(i), 3_000);
        m.settle();
        assert_eq!(m.selected_row().unwrap().cpu, Some(0.25));
        m.update("ns:a:web", None, 4_000);
        m.settle();
        assert_eq!(m.total(), 0);
    }

    #[test]
    fn counts_per_state_come_in_the_states_order() {
        let mut m = Model::default();
        m.set_all(
            vec![
                inst("ns:a:x", "x", "failed"),
                inst("ns:b:x", "x", "ready"),
                inst("ns:c:x", "x", "ready"),
            ],
            0,
        );
        assert_eq!(m.counts(), [("ready", 2), ("failed", 1)]);
    }
}
