//! `bench-report`: turns the markdown tables the benchmarks write into PNG plots and
//! puts both into `docs/benchmarks.md`.
//!
//! ```sh
//! bench-report --results DIR --doc docs/benchmarks.md --plots docs/bench
//! ```
//!
//! Every `DIR/<name>.md` (what `cargo bench --bench <name> -- --write` wrote) becomes
//! `<plots>/<name>.png` (p50 and p99 of each row that has them) and replaces the region
//! between `<!-- bench:<name> -->` and `<!-- /bench:<name> -->` in the doc, so the prose
//! around the figures stays as written. A result without markers is appended as a new
//! section.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let results = arg("--results").context("--results DIR is required")?;
    let doc = arg("--doc").unwrap_or_else(|| PathBuf::from("docs/benchmarks.md"));
    let plots = arg("--plots").unwrap_or_else(|| PathBuf::from("docs/bench"));
    std::fs::create_dir_all(&plots)?;
    register_font()?;
    let mut text =
        std::fs::read_to_string(&doc).with_context(|| format!("cannot read {}", doc.display()))?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&results)
        .with_context(|| format!("cannot read {}", results.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    names.sort();
    for path in names {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("result file name")?
            .to_owned();
        let fragment = std::fs::read_to_string(&path)?;
        let rows = parse_rows(&fragment);
        let png = plots.join(format!("{name}.png"));
        let mut body = fragment.trim_end().to_owned();
        if !rows.is_empty() {
            plot(&name, &unit(&fragment), &rows, &png)?;
            let rel = relative(&png, doc.parent().unwrap_or(Path::new(".")));
            body.push_str(&format!("\n\n![{name}: p50 and p99]({rel})\n"));
        }
        text = splice(&text, &name, &body);
        eprintln!("{name}: {} rows", rows.len());
    }
    std::fs::write(&doc, text)?;
    eprintln!("wrote {}", doc.display());
    Ok(())
}

/// One table row: its label, p50 and p99 in milliseconds.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    label: String,
    p50: f64,
    p99: f64,
}

/// The rows of every markdown table whose header has `p50` and `p99` columns.
fn parse_rows(md: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cols: Option<(usize, usize)> = None;
    for line in md.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            cols = None;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        let find = |key: &str| cells.iter().position(|c| c.starts_with(key));
        match (find("p50"), find("p99"), cols) {
            (Some(a), Some(b), _) => cols = Some((a, b)),
            (_, _, Some((a, b))) => {
                let num = |i: usize| {
                    cells
                        .get(i)
                        .and_then(|c| c.split_whitespace().next()?.parse::<f64>().ok())
                };
                if let (Some(p50), Some(p99)) = (num(a), num(b)) {
                    rows.push(Row {
                        label: cells[0].replace('`', ""),
                        p50,
                        p99,
                    });
                }
            }
            _ => {}
        }
    }
    rows
}

/// The unit of the p50 column (`p50 µs` -> `µs`); `ms` when the header names none.
fn unit(md: &str) -> String {
    md.lines()
        .filter(|l| l.trim().starts_with('|'))
        .flat_map(|l| l.split('|'))
        .map(str::trim)
        .find_map(|c| c.strip_prefix("p50 "))
        .and_then(|u| u.split_whitespace().next())
        .filter(|u| !u.is_empty() && u.len() <= 4)
        .unwrap_or("ms")
        .to_owned()
}

/// Replaces the marked region for `name`, or appends a new marked section.
fn splice(doc: &str, name: &str, body: &str) -> String {
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    match (doc.find(&open), doc.find(&close)) {
        (Some(a), Some(b)) if a < b => format!("{}{open}\n{body}\n{}", &doc[..a], &doc[b..]),
        _ => format!(
            "{}\n\n## {name} (generated)\n\n{open}\n{body}\n{close}\n",
            doc.trim_end()
        ),
    }
}

fn relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// plotters draws text with ab_glyph, which needs a font: DejaVu Sans from Debian's
/// fonts-dejavu-core.
fn register_font() -> anyhow::Result<()> {
    let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read {path} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Horizontal bars: p50 and p99 of each row, the row's label above its bars.
fn plot(name: &str, unit: &str, rows: &[Row], png: &Path) -> anyhow::Result<()> {
    let height = 80 + 64 * rows.len() as u32;
    let root = BitMapBackend::new(png, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows.iter().map(|r| r.p99.max(r.p50)).fold(0.0f64, f64::max) * 1.25;
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: {unit}, p50 (dark) and p99 (light)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..max.max(1e-6), 0.0..n)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_label_style(("sans-serif", 12))
        .draw()?;
    for (i, r) in rows.iter().enumerate() {
        let top = n - i as f64;
        let label: String = if r.label.chars().count() > 110 {
            format!("{}…", r.label.chars().take(109).collect::<String>())
        } else {
            r.label.clone()
        };
        chart.draw_series([Text::new(
            label,
            (max * 0.002, top - 0.05),
            ("sans-serif", 13),
        )])?;
        let (b50, b99) = (top - 0.38, top - 0.62);
        chart.draw_series([
            Rectangle::new([(0.0, b50), (r.p50, b99)], RGBColor(30, 80, 160).filled()),
            Rectangle::new(
                [(0.0, b99), (r.p99, top - 0.86)],
                RGBColor(150, 180, 230).filled(),
            ),
        ])?;
        chart.draw_series([Text::new(
            format!("{:.3} / {:.3}", r.p50, r.p99),
            (r.p99.max(r.p50) + max * 0.01, b50 + 0.02),
            ("sans-serif", 12),
        )])?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_tables_with_p50_and_p99() {
        let md = "| measurement | p50 ms | p99 ms | x |\n|---|---|---|---|\n| a `b` | 1.5 | 2.0 | 1.00x |\n| skip | - | - | - |\n\ntext\n| other | n |\n| z | 3 |\n";
        assert_eq!(
            parse_rows(md),
            vec![Row {
                label: "a b".into(),
                p50: 1.5,
                p99: 2.0
            }]
        );
    }

    #[test]
    fn the_unit_comes_from_the_p50_header() {
        assert_eq!(
            unit("| round trip | p50 µs | p99 µs | p50 vs raw |\n|---|---|---|---|\n"),
            "µs"
        );
        assert_eq!(unit("| measurement | p50 ms | p99 ms |\n"), "ms");
        assert_eq!(unit("| measurement | p50 | p99 |\n"), "ms");
    }

    #[test]
    fn splice_replaces_the_marked_region_or_appends() {
        let doc = "intro\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nafter\n";
        assert_eq!(
            splice(doc, "x", "new"),
            "intro\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nafter\n"
        );
        let appended = splice("intro\n", "y", "fresh");
        assert!(appended.contains("<!-- bench:y -->\nfresh\n<!-- /bench:y -->"));
    }
}
