//! Drawing the model: a header with the counts per state, the instance table (only the
//! rows on screen are built), the panes, and a line of keys or the prompt.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row as TRow, Table, Wrap};
use ratatui::Frame;

use super::model::{Mode, Model, Row};
use crate::output::{exit_text, human_age, human_bytes};
use bulkhead_core::text::escape;

/// The table's columns: title, width, and the narrowest terminal that shows it.
const COLUMNS: [(&str, u16, u16); 12] = [
    ("ID", 0, 0),
    ("WORKLOAD", 12, 80),
    ("DRIVER", 7, 110),
    ("STATE", 10, 0),
    ("READY", 5, 100),
    ("PID", 7, 0),
    ("RST", 3, 0),
    ("BREAKER", 9, 120),
    ("CPU", 6, 0),
    ("MEMORY", 16, 0),
    ("AGE", 5, 0),
    ("ADDRESS", 15, 130),
];

pub fn draw(f: &mut Frame, m: &mut Model, colour: bool, now_ms: u64) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header(m, colour)), head);
    match &m.mode {
        Mode::Detail => detail(f, m, body),
        Mode::Logs | Mode::LogSearch => logs(f, m, body),
        Mode::Events => events(f, m, body),
        Mode::Help => help(f, body),
        Mode::Launch => launch(f, m, body),
        _ => table(f, m, body, colour, now_ms),
    }
    f.render_widget(Paragraph::new(footer(m)), foot);
}

fn paint(colour: bool, c: Color) -> Style {
    if colour {
        Style::default().fg(c)
    } else {
        Style::default()
    }
}

fn state_style(state: &str, colour: bool) -> Style {
    match state {
        "ready" => paint(colour, Color::Green),
        "failed" | "crashed" => paint(colour, Color::Red),
        "starting" | "stopping" | "restarting" => paint(colour, Color::Yellow),
        _ => Style::default(),
    }
}

fn header(m: &Model, colour: bool) -> Line<'static> {
    let mut spans = vec![
        Span::styled(
            "bulkhead top",
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!("  {} instances", m.total())),
    ];
    for (state, n) in m.counts() {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(
            format!("{n} {state}"),
            state_style(state, colour),
        ));
    }
    spans.push(Span::raw(format!(
        "  sort: {}{}",
        m.sort.name(),
        if m.descending { " (desc)" } else { "" }
    )));
    if !m.filter.is_empty() {
        spans.push(Span::raw(format!(
            "  filter: {} ({} shown)",
            escape(&m.filter),
            m.visible_len()
        )));
    }
    Line::from(spans)
}

fn footer(m: &Model) -> Line<'static> {
    let text = match &m.mode {
        Mode::Filter => format!("filter: {}_", escape(&m.filter)),
        Mode::LogSearch => format!("search: {}_", escape(&m.log_search)),
        Mode::Launch => format!(
            "launch (WORKLOAD [ns:NS|session:SID]): {}_",
            escape(&m.input)
        ),
        Mode::Confirm(a) => format!("{} y/n", escape(&a.question())),
        _ => match &m.status {
            Some(s) => escape(s).into_owned(),
            None => match m.mode {
                Mode::Logs => "esc back  / search  ↑↓ pgup pgdn scroll  G follow".into(),
                Mode::Table => "q quit  / filter  s sort  enter detail  l logs  t terminate  r restart  n launch  x end session  e events  ? help".into(),
                _ => "esc back".into(),
            },
        },
    };
    Line::from(Span::styled(
        text,
        Style::default().add_modifier(Modifier::REVERSED),
    ))
}

fn cells(r: &Row, now_ms: u64, colour: bool, shown: &[usize]) -> Vec<Cell<'static>> {
    let i = &r.inst;
    let mem = match i.usage.as_ref() {
        Some(u) => match u.memory_limit_bytes {
            Some(l) => format!("{}/{}", human_bytes(u.memory_bytes), human_bytes(l)),
            None => human_bytes(u.memory_bytes),
        },
        None => String::new(),
    };
    let all: [Cell<'static>; 12] = [
        Cell::from(escape(&i.id).into_owned()),
        Cell::from(escape(&i.workload).into_owned()),
        Cell::from(i.driver.clone()),
        Cell::from(Span::styled(i.state.clone(), state_style(&i.state, colour))),
        Cell::from(if i.ready { "yes" } else { "no" }),
        Cell::from(i.pid.map(|p| p.to_string()).unwrap_or_default()),
        Cell::from(i.restarts.to_string()),
        Cell::from(i.breaker.clone()),
        Cell::from(
            r.cpu
                .map(|c| format!("{:.0}%", c * 100.0))
                .unwrap_or_default(),
        ),
        Cell::from(mem),
        Cell::from(crate::output::age(i, now_ms)),
        Cell::from(if i.pid.is_some() {
            i.address.clone()
        } else {
            String::new()
        }),
    ];
    all.into_iter()
        .enumerate()
        .filter(|(n, _)| shown.contains(n))
        .map(|(_, c)| c)
        .collect()
}

fn table(f: &mut Frame, m: &mut Model, area: Rect, colour: bool, now_ms: u64) {
    let shown: Vec<usize> = (0..COLUMNS.len())
        .filter(|&n| area.width >= COLUMNS[n].2)
        .collect();
    let widths: Vec<Constraint> = shown
        .iter()
        .map(|&n| match COLUMNS[n].1 {
            0 => Constraint::Min(16),
            w => Constraint::Length(w),
        })
        .collect();
    // Only the rows on screen are built: the cost of a frame does not grow with the
    // number of instances.
    let height = area.height.saturating_sub(1) as usize;
    m.page = height.max(1);
    let offset = if m.selected < height {
        0
    } else {
        m.selected + 1 - height
    };
    let rows: Vec<TRow> = m
        .window(offset, height)
        .enumerate()
        .map(|(n, r)| {
            let row = TRow::new(cells(r, now_ms, colour, &shown));
            if offset + n == m.selected {
                row.style(Style::default().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let head = TRow::new(shown.iter().map(|&n| COLUMNS[n].0))
        .style(Style::default().add_modifier(Modifier::BOLD));
    let empty = rows.is_empty();
    f.render_widget(
        Table::new(rows, widths).header(head).column_spacing(1),
        area,
    );
    if empty {
        let msg = if m.total() == 0 {
            "no instances (n: launch one)"
        } else {
            "no instance matches the filter"
        };
        let r = Rect {
            y: area.y + 1,
            height: 1,
            ..area
        };
        f.render_widget(Paragraph::new(msg), r);
    }
}

fn pane(title: String) -> Block<'static> {
    Block::default().borders(Borders::ALL).title(title)
}

fn detail(f: &mut Frame, m: &Model, area: Rect) {
    let Some(r) = m.selected_row() else {
        return;
    };
    let i = &r.inst;
    let mut lines = vec![
        format!(
            "workload   {}   driver {}   isolation {}",
            i.workload, i.driver, i.isolation
        ),
        format!(
            "state      {}{}   pid {}   address {}",
            i.state,
            if i.ready { " (ready)" } else { "" },
            i.pid.map(|p| p.to_string()).unwrap_or("-".into()),
            i.address
        ),
        format!(
            "restarts   {}   breaker {} ({} consecutive failures)",
            i.restarts, i.breaker, i.consecutive_failures
        ),
        format!(
            "last exit  {}",
            i.last_exit.as_ref().map(exit_text).unwrap_or("-".into())
        ),
        format!("failure    {}", i.failure.as_deref().unwrap_or("-")),
        format!("status     {}", i.status_text.as_deref().unwrap_or("-")),
        format!(
            "leases     {}",
            if i.leases.is_empty() {
                "-".into()
            } else {
                i.leases.join(", ")
            }
        ),
        format!(
            "channels   {}",
            if i.channels.is_empty() {
                "-".into()
            } else {
                i.channels
                    .iter()
                    .map(|c| format!("{} ({})", c.name, c.direction))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    ];
    if let Some(u) = &i.usage {
        lines.push(format!(
            "usage      {} processes, memory {}{}",
            u.pids,
            human_bytes(u.memory_bytes),
            u.memory_peak_bytes
                .map(|p| format!(" (peak {})", human_bytes(p)))
                .unwrap_or_default()
        ));
    }
    lines.push(String::new());
    lines.push("last events:".into());
    for e in m.events_of(&i.id) {
        lines.push(format!(
            "  {} {}",
            human_age(crate::output::now_ms().saturating_sub(e.time_ms)),
            crate::output::event_line(e)
        ));
    }
    lines.push(String::new());
    match &m.spec {
        Some((id, spec)) if *id == i.id => {
            lines.push("manifest of the current run:".into());
            lines.extend(spec.iter().map(|l| format!("  {l}")));
        }
        _ => lines.push("manifest of the current run: (reading)".into()),
    }
    let text: Vec<Line> = lines
        .into_iter()
        .map(|l| Line::from(escape(&l).into_owned()))
        .collect();
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(text)
            .block(pane(format!(" {} ", escape(&i.id))))
            .wrap(Wrap { trim: false }),
        area,
    );
}

fn launch(f: &mut Frame, m: &Model, area: Rect) {
    let lines: Vec<Line> = m
        .workload_choices()
        .into_iter()
        .map(|(n, d)| {
            Line::from(if d.is_empty() {
                escape(n).into_owned()
            } else {
                format!("{:<24} {}", escape(n), escape(d))
            })
        })
        .collect();
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(lines).block(pane(
            " launch: a workload (tab completes), then ns:NAMESPACE or session:SESSION ".into(),
        )),
        area,
    );
}

fn logs(f: &mut Frame, m: &Model, area: Rect) {
    let shown = m.shown_logs();
    let height = area.height.saturating_sub(2) as usize;
    let end = shown.len().saturating_sub(m.log_scroll.min(shown.len()));
    let start = end.saturating_sub(height);
    let lines: Vec<Line> = shown[start..end]
        .iter()
        .map(|l| Line::from(escape(l).into_owned()))
        .collect();
    let title = format!(
        " logs of {}{}{} ",
        escape(m.logs_of.as_deref().unwrap_or("-")),
        if m.log_search.is_empty() {
            String::new()
        } else {
            format!(" matching {:?}", m.log_search)
        },
        if m.log_scroll == 0 {
            " (following)"
        } else {
            ""
        }
    );
    f.render_widget(Clear, area);
    f.render_widget(Paragraph::new(lines).block(pane(title)), area);
}

fn events(f: &mut Frame, m: &Model, area: Rect) {
    let height = area.height.saturating_sub(2) as usize;
    let n = m.all_events.len();
    let lines: Vec<Line> = m
        .all_events
        .iter()
        .skip(n.saturating_sub(height))
        .map(|e| Line::from(escape(&crate::output::event_line(e)).into_owned()))
        .collect();
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(lines).block(pane(" events (live) ".into())),
        area,
    );
}

fn help(f: &mut Frame, area: Rect) {
    let text = "\
↑ ↓ j k, pgup pgdn, g G   move
/            filter: words that must all match id, workload, namespace, session or state
s / S        sort by the next column / reverse the order
enter        the selected instance: state, last exit, failure, leases, channels, events
l            its log, followed live (/ searches, ↑ ↓ scroll, G follows again)
t / r        terminate / restart it (asks first)
x            end its session (asks first)
n            launch: WORKLOAD, or WORKLOAD ns:NAMESPACE, or WORKLOAD session:SESSION
e            the daemon's events, live
q, esc       back; in the table, quit (the terminal is restored)

Rows follow the event stream; CPU and memory are read for the rows on screen.";
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(text)
            .block(pane(" help ".into()))
            .wrap(Wrap { trim: false }),
        area,
    );
}
