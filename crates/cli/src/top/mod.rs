//! `bulkhead top`: every instance live in the terminal (ratatui).
//!
//! How it stays cheap: the rows come from one `list` at start, then follow the event
//! stream (`watch`): each event is applied to its row (state, pid, restarts, breaker,
//! last exit; a new instance gets a row), so the table and its counts need no reads. An
//! event also marks its instance, and the marked ones *on screen* are read again (`get`,
//! one refresh at a time, at most ten a second) for what events do not carry. CPU and
//! memory are read on a period (`--interval`) for the rows on screen only. Nothing polls
//! every instance, and a burst of thousands of events costs a few `get`s. The table
//! builds only the rows on screen.
//!
//! `model` is the state and the keys (pure, unit-tested); `view` draws it.

mod model;
mod view;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bulkhead_api::v1;
use ratatui::crossterm::event::{self as ct, Event as TermEvent, KeyCode, KeyModifiers};
use tokio::sync::mpsc;

use crate::cli::TopArgs;
use crate::client::connect;
use crate::exit::from_status;
use model::{Command, Key, Model};

enum Msg {
    Key(Key),
    Redraw,
    Event(Box<v1::Event>),
    /// An instance as read now; `None`: it is gone.
    Instance(String, Option<Box<v1::Instance>>),
    Log(String, String),
    Status(String),
    /// The manifest of an instance's current run, as JSON.
    Spec(String, String),
    Workloads(Vec<(String, String)>),
    /// A refresh of marked instances is done: the next may start.
    Refreshed,
}

pub async fn top(socket: &Path, a: TopArgs) -> anyhow::Result<()> {
    let interval = crate::client::parse_duration("--interval", &a.interval)?;
    let mut c = connect(socket).await?;
    let mut m = Model::default();
    // The panes' history first (it ends), then the rows, then live events from where the
    // history ended: an event between the two is both in the listing and marks its row.
    let mut last_id = 0;
    {
        let mut history = c
            .watch(v1::WatchRequest {
                since_id: 0,
                history_only: true,
            })
            .await
            .map_err(from_status)?
            .into_inner();
        while let Some(e) = history.message().await.map_err(from_status)? {
            last_id = e.id;
            m.event(e);
        }
    }
    let list = c
        .list(v1::ListRequest::default())
        .await
        .map_err(from_status)?
        .into_inner()
        .instances;
    m.set_all(list, crate::output::now_ms());
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if a.once {
        return once(&mut m, &a, colour);
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    spawn_input(tx.clone());
    {
        // Live events.
        let mut c = c.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let stream = c
                .watch(v1::WatchRequest {
                    since_id: last_id,
                    history_only: false,
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    let _ = tx.send(Msg::Status(format!("event stream: {}", e.message())));
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(e)) => {
                        if tx.send(Msg::Event(Box::new(e))).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Msg::Status("the daemon ended the event stream".into()));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Msg::Status(format!("event stream: {}", e.message())));
                        return;
                    }
                }
            }
        });
    }

    let mut terminal = ratatui::init();
    let result = run(&mut terminal, &mut m, c, tx, &mut rx, interval, colour).await;
    ratatui::restore();
    result
}

/// One frame, printed as text (`--once`): for scripts and tests.
fn once(m: &mut Model, a: &TopArgs, colour: bool) -> anyhow::Result<()> {
    let backend = ratatui::backend::TestBackend::new(a.width, a.height);
    let mut t = ratatui::Terminal::new(backend).context("cannot make the frame")?;
    let now = crate::output::now_ms();
    t.draw(|f| view::draw(f, m, colour, now))
        .context("cannot draw the frame")?;
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    crate::output::out!("{out}");
    Ok(())
}

/// The terminal's keys, read on a thread of their own (crossterm's read blocks).
fn spawn_input(tx: mpsc::UnboundedSender<Msg>) {
    std::thread::spawn(move || loop {
        let msg = match ct::read() {
            Ok(TermEvent::Key(k)) if k.kind != ct::KeyEventKind::Release => {
                let key = match k.code {
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        Key::Interrupt
                    }
                    KeyCode::Char(ch) => Key::Char(ch),
                    KeyCode::Enter => Key::Enter,
                    KeyCode::Tab => Key::Char('\t'),
                    KeyCode::Esc => Key::Esc,
                    KeyCode::Backspace => Key::Backspace,
                    KeyCode::Up => Key::Up,
                    KeyCode::Down => Key::Down,
                    KeyCode::PageUp => Key::PageUp,
                    KeyCode::PageDown => Key::PageDown,
                    KeyCode::Home => Key::Home,
                    KeyCode::End => Key::End,
                    _ => continue,
                };
                Msg::Key(key)
            }
            Ok(TermEvent::Resize(..)) => Msg::Redraw,
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.send(msg).is_err() {
            return;
        }
    });
}

async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    m: &mut Model,
    c: bulkhead_api::Client,
    tx: mpsc::UnboundedSender<Msg>,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    interval: Duration,
    colour: bool,
) -> anyhow::Result<()> {
    let mut marked: HashSet<String> = HashSet::new();
    // One refresh at a time: answers of concurrent ones could arrive out of order and an
    // older listing overwrite a newer one. Marks made meanwhile wait for the next.
    let mut refreshing = false;
    let mut refresh = tokio::time::interval(Duration::from_millis(100));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut usage = tokio::time::interval(interval);
    usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The AGE column moves on even when nothing happens.
    let mut clock = tokio::time::interval(Duration::from_secs(1));
    let mut logs: Option<tokio::task::JoinHandle<()>> = None;
    let mut dirty = true;
    // A key is drawn at once; anything else at most every FRAME, so that a burst of
    // events (thousands a second) is applied in batches and costs one sort and one frame
    // per batch, not per event.
    const FRAME: Duration = Duration::from_millis(50);
    let mut urgent = true;
    let mut last_frame = tokio::time::Instant::now();
    let mut frame = tokio::time::interval(FRAME);
    frame.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if dirty && (urgent || last_frame.elapsed() >= FRAME) {
            m.settle();
            let now = crate::output::now_ms();
            terminal
                .draw(|f| view::draw(f, m, colour, now))
                .context("cannot draw")?;
            dirty = false;
            urgent = false;
            last_frame = tokio::time::Instant::now();
        }
        tokio::select! {
            Some(first) = rx.recv() => {
              // This message and every one already waiting (up to a bound), then a frame.
              let mut next = Some(first);
              let mut handled = 0;
              while let Some(msg) = next.take() {
                dirty = true;
                handled += 1;
                if handled < 20_000 {
                    next = rx.try_recv().ok();
                }
                match msg {
                    Msg::Key(k) => {
                        urgent = true;
                        m.status = None;
                        for cmd in m.key(k) {
                            match cmd {
                                Command::Quit => {
                                    if let Some(l) = logs.take() {
                                        l.abort();
                                    }
                                    return Ok(());
                                }
                                Command::FollowLogs(id) => {
                                    if let Some(l) = logs.take() {
                                        l.abort();
                                    }
                                    logs = Some(tokio::spawn(follow_logs(c.clone(), id, tx.clone())));
                                }
                                Command::StopLogs => {
                                    if let Some(l) = logs.take() {
                                        l.abort();
                                    }
                                }
                                Command::FetchSpec(id) => {
                                    tokio::spawn(fetch_spec(c.clone(), id, tx.clone()));
                                }
                                Command::FetchWorkloads => {
                                    tokio::spawn(fetch_workloads(c.clone(), tx.clone()));
                                }
                                other => {
                                    tokio::spawn(act(c.clone(), other, tx.clone()));
                                }
                            }
                        }
                    }
                    Msg::Redraw => {}
                    Msg::Event(e) => {
                        marked.insert(e.instance.clone());
                        m.event(*e);
                    }
                    Msg::Instance(id, i) => m.update(&id, i.map(|b| *b), crate::output::now_ms()),
                    Msg::Log(id, line) => m.log_line(&id, line),
                    Msg::Status(s) => m.status = Some(s),
                    Msg::Spec(id, json) => {
                        let text = serde_json::from_str::<serde_json::Value>(&json)
                            .and_then(|v| serde_json::to_string_pretty(&v))
                            .unwrap_or(json);
                        m.spec = Some((id, text.lines().map(str::to_owned).collect()));
                    }
                    Msg::Workloads(w) => m.workloads = w,
                    Msg::Refreshed => refreshing = false,
                }
              }
            }
            _ = frame.tick(), if dirty => {}
            _ = refresh.tick(), if !marked.is_empty() && !refreshing => {
                // Events already moved every row; the rows on screen are read again
                // for the rest. The other marks go: a row scrolled into view is read at
                // the next usage tick.
                let start = m.selected.saturating_sub(m.page.saturating_sub(1));
                let ids: Vec<String> = m
                    .window_ids(start, m.page + 1)
                    .into_iter()
                    .filter(|id| marked.contains(id))
                    .collect();
                marked.clear();
                if ids.is_empty() {
                    continue;
                }
                refreshing = true;
                let (c, tx) = (c.clone(), tx.clone());
                tokio::spawn(async move {
                    read_again(c, ids, tx.clone()).await;
                    let _ = tx.send(Msg::Refreshed);
                });
            }
            _ = usage.tick() => {
                // The rows on screen, whose CPU and memory are shown.
                let start = m.selected.saturating_sub(m.page.saturating_sub(1));
                let ids = m.window_ids(start, m.page + 1);
                if !ids.is_empty() {
                    tokio::spawn(read_again(c.clone(), ids, tx.clone()));
                }
            }
            _ = clock.tick() => dirty = true,
        }
    }
}

/// Reads instances again, one `get` each.
async fn read_again(mut c: bulkhead_api::Client, ids: Vec<String>, tx: mpsc::UnboundedSender<Msg>) {
    for id in ids {
        let got = c
            .get(v1::GetRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await;
        let msg = match got {
            Ok(i) => Msg::Instance(id, Some(Box::new(i.into_inner()))),
            Err(s) if s.code() == tonic::Code::NotFound => Msg::Instance(id, None),
            Err(s) => Msg::Status(format!("get {id}: {}", s.message())),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The manifest of `id`'s current run, for the detail pane.
async fn fetch_spec(mut c: bulkhead_api::Client, id: String, tx: mpsc::UnboundedSender<Msg>) {
    let got = c
        .get(v1::GetRequest {
            id: id.clone(),
            with_spec: true,
        })
        .await;
    let _ = tx.send(match got {
        Ok(i) => Msg::Spec(id, i.into_inner().spec_json.unwrap_or_default()),
        Err(s) => Msg::Status(format!("get {id}: {}", s.message())),
    });
}

/// The valid workloads, for the launch prompt.
async fn fetch_workloads(mut c: bulkhead_api::Client, tx: mpsc::UnboundedSender<Msg>) {
    let got = c.list_workloads(v1::ListWorkloadsRequest {}).await;
    let _ = tx.send(match got {
        Ok(r) => Msg::Workloads(
            r.into_inner()
                .workloads
                .into_iter()
                .filter(|w| w.valid)
                .map(|w| (w.name, w.description.unwrap_or_default()))
                .collect(),
        ),
        Err(s) => Msg::Status(format!("workloads: {}", s.message())),
    });
}

/// Follows one instance's log into the pane.
async fn follow_logs(mut c: bulkhead_api::Client, id: String, tx: mpsc::UnboundedSender<Msg>) {
    let stream = c
        .logs(v1::LogsRequest {
            id: id.clone(),
            follow: true,
            tail_lines: 1_000,
            since_unix_ms: 0,
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = tx.send(Msg::Status(format!("logs of {id}: {}", e.message())));
            return;
        }
    };
    while let Ok(Some(chunk)) = stream.message().await {
        for l in chunk.lines {
            let text = String::from_utf8_lossy(&l.data);
            let line = match v1::LogStream::try_from(l.stream).unwrap_or(v1::LogStream::Stdout) {
                v1::LogStream::Stderr => format!("err│ {text}"),
                v1::LogStream::Bulkhead => format!("---  {text}"),
                _ => format!("out│ {text}"),
            };
            if tx.send(Msg::Log(id.clone(), line)).is_err() {
                return;
            }
        }
    }
}

/// Carries out an action; its outcome goes to the status line.
async fn act(mut c: bulkhead_api::Client, cmd: Command, tx: mpsc::UnboundedSender<Msg>) {
    let said = match cmd {
        Command::Terminate(id) => {
            let _ = tx.send(Msg::Status(format!("terminating {id} ...")));
            c.terminate(v1::TerminateRequest {
                id: id.clone(),
                grace_ms: None,
                with_dependencies: false,
            })
            .await
            .map(|_| format!("{id} terminated"))
        }
        Command::Restart(id) => {
            let _ = tx.send(Msg::Status(format!("restarting {id} ...")));
            c.restart(v1::RestartRequest {
                id: id.clone(),
                grace_ms: None,
                new_spec: false,
            })
            .await
            .map(|_| format!("{id} restarted and ready"))
        }
        Command::EndSession(s) => c
            .end_session(v1::EndScopeRequest {
                name: s.clone(),
                grace_ms: None,
            })
            .await
            .map(|r| {
                format!(
                    "session {s} ended ({} instances)",
                    r.into_inner().terminated.len()
                )
            }),
        Command::Launch {
            workload,
            namespace,
            session,
        } => c
            .launch(v1::LaunchRequest {
                workload: workload.clone(),
                namespace,
                session,
                wait: v1::WaitFor::Started as i32,
                timeout_ms: 0,
                lease: None,
            })
            .await
            .map(|r| match r.into_inner().instance {
                Some(i) => format!("launched {}", i.id),
                None => format!("launched {workload}"),
            }),
        Command::Quit
        | Command::FollowLogs(_)
        | Command::StopLogs
        | Command::FetchSpec(_)
        | Command::FetchWorkloads => return,
    };
    let _ = tx.send(Msg::Status(match said {
        Ok(s) => s,
        Err(e) => format!("failed: {}", e.message()),
    }));
}
