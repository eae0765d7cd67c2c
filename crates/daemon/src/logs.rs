//! Per-instance logs: the instance's stdout and stderr, a record per line with its time,
//! stream and run ([`bulkhead_core::logline`]), in arrival order, written to
//! `<state>/logs/<instance id>.log`, size-bounded by rotation to `.1` ... `.<generations>`
//! files. Between runs of a key the daemon writes a mark (`bulkhead` stream): run N
//! started (pid), run N exited (status).
//!
//! Output comes either from pipes the daemon drains here (sandbox, docker, `--no-keeper`)
//! or forwarded by the keeper ([`bulkhead_driver::OutputTap`]; the daemon then holds no
//! pipe). Followers get what is on disk, then live records, without a gap: both are taken
//! under the writer's lock.
//!
//! **Descriptors.** A log's file stays open while its instance writes, so that appends
//! cost one system call, but only for the first [`open_file_budget`] logs: past that, a
//! log opens its file for each write and closes it again (10,000 chatty instances must
//! not need 10,000 descriptors).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bulkhead_core::logline::{self, LogStream, Record};
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;

/// The default size at which a log rotates.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// The default number of rotated files kept besides the current one.
pub const DEFAULT_GENERATIONS: u32 = 1;

/// Live records, as followers receive them.
pub type Live = broadcast::Receiver<Arc<Vec<Record>>>;

pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    generations: u32,
    inner: Mutex<Inner>,
    open_streams: AtomicUsize,
    /// Turns true when no stream is open (the output of the run has ended).
    quiet: tokio::sync::watch::Sender<bool>,
}

/// Log files held open at once, across all logs: an eighth of the open-files limit,
/// between 16 and 1,024.
pub fn open_file_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        (limit / 8).clamp(16, 1024) as usize
    })
}

static OPEN_FILES: AtomicUsize = AtomicUsize::new(0);

/// A log file counted against [`open_file_budget`] while it is open.
struct Counted(File);

impl Drop for Counted {
    fn drop(&mut self) {
        OPEN_FILES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A log file opened for appending: counted if the budget allowed, else to be closed
/// right after the write.
enum Opened {
    Kept(Counted),
    Once(File),
}

impl Opened {
    fn open(path: &Path) -> io::Result<Opened> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        if OPEN_FILES.fetch_add(1, Ordering::SeqCst) < open_file_budget() {
            Ok(Opened::Kept(Counted(f)))
        } else {
            OPEN_FILES.fetch_sub(1, Ordering::SeqCst);
            Ok(Opened::Once(f))
        }
    }

    fn file(&mut self) -> &mut File {
        match self {
            Opened::Kept(Counted(f)) | Opened::Once(f) => f,
        }
    }
}

struct Inner {
    /// Open while the instance writes and the budget allows.
    file: Option<Counted>,
    size: u64,
    tx: Option<broadcast::Sender<Arc<Vec<Record>>>>,
    /// The run the output belongs to (1 for the first run of the instance).
    run: u32,
}

/// What a reader gets: the records on disk and, while the log is open, a live receiver.
pub struct Snapshot {
    pub records: Vec<Record>,
    pub live: Option<Live>,
}

impl LogFile {
    /// The log of an instance, rotated at `max_bytes`, `generations` rotated files kept.
    /// Nothing is opened until an instance writes to it.
    pub fn new(dir: &Path, stem: &str, max_bytes: u64, generations: u32) -> LogFile {
        LogFile {
            path: dir.join(format!("{stem}.log")),
            max_bytes: max_bytes.max(4096),
            generations: generations.max(1),
            inner: Mutex::new(Inner {
                file: None,
                size: 0,
                tx: None,
                run: 0,
            }),
            open_streams: AtomicUsize::new(0),
            quiet: tokio::sync::watch::Sender::new(true),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the log and its rotated generations: the instance is forgotten.
    pub fn remove_files(&self) {
        remove_log_files(&self.path);
    }

    fn generation(&self, n: u32) -> PathBuf {
        generation(&self.path, n)
    }

    /// A new run begins (`run` = 1 for the first): its output is tagged with it, after a
    /// mark that says so.
    pub fn start_run(&self, run: u32, what: &str) {
        self.lock().run = run;
        self.mark(what);
    }

    /// A line from the daemon (the `bulkhead` stream) in the current run.
    pub fn mark(&self, text: &str) {
        let run = self.lock().run;
        let rec = Record {
            time_ms: crate::events::now_ms(),
            stream: LogStream::Bulkhead,
            run,
            partial: false,
            data: text.as_bytes().to_vec(),
        };
        if let Err(e) = self.append(vec![rec]) {
            tracing::warn!("log of {}: {e}", self.path.display());
        }
    }

    /// Waits (up to `limit`) until the current run's output has ended: every stream
    /// closed. A launch that failed reads the program's last words after this.
    pub async fn output_ended(&self, limit: std::time::Duration) {
        let mut rx = self.quiet.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|q| *q)).await;
    }

    /// The last `n` lines the current run wrote to stderr.
    pub fn stderr_tail(&self, n: usize) -> Vec<String> {
        let run = self.lock().run;
        let Ok(snap) = self.snapshot(None, 0) else {
            return Vec::new();
        };
        let mine: Vec<Record> = snap
            .records
            .into_iter()
            .filter(|r| r.run == run && r.stream == LogStream::Stderr)
            .collect();
        let mut lines: Vec<String> = Vec::new();
        let mut open = false;
        for r in logline::tail_lines(mine, n) {
            let text = String::from_utf8_lossy(&r.data);
            match lines.last_mut() {
                Some(last) if open => last.push_str(&text),
                _ => lines.push(text.into_owned()),
            }
            open = r.partial;
        }
        lines
    }

    /// Starts draining the given pipe read ends. The log is live until all of them reach
    /// end of file.
    pub fn attach(self: &Arc<Self>, stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) {
        let fds: Vec<(LogStream, OwnedFd)> =
            [(LogStream::Stdout, stdout), (LogStream::Stderr, stderr)]
                .into_iter()
                .filter_map(|(s, fd)| Some((s, fd?)))
                .collect();
        if fds.is_empty() {
            return;
        }
        self.go_live();
        for (stream, fd) in fds {
            self.open_streams.fetch_add(1, Ordering::SeqCst);
            self.quiet.send_replace(false);
            let log = self.clone();
            tokio::spawn(async move {
                if let Err(e) = log.pump(stream, fd).await {
                    tracing::warn!("log of {}: {e}", log.path.display());
                }
                log.stream_ended();
            });
        }
    }

    fn go_live(&self) {
        let mut inner = self.lock();
        if inner.tx.is_none() {
            inner.tx = Some(broadcast::channel(256).0);
        }
    }

    /// Takes the output the keeper forwards for this instance. The log is live until
    /// both streams end.
    pub fn attach_tap(self: &Arc<Self>, tap: &bulkhead_driver::OutputTap) {
        self.go_live();
        self.open_streams.fetch_add(2, Ordering::SeqCst);
        self.quiet.send_replace(false);
        tap.connect(Arc::new(TapSink(Arc::clone(self))));
    }

    /// One stream ended: after the last, followers see the end and the file is closed
    /// (a finished instance, kept for `get` and `logs`, holds no descriptor; a next run's
    /// output opens it again).
    fn stream_ended(&self) {
        if self.open_streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut inner = self.lock();
            inner.tx = None;
            inner.file = None;
            self.quiet.send_replace(true);
        }
    }

    async fn pump(&self, stream: LogStream, fd: OwnedFd) -> io::Result<()> {
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            self.write(stream, &buf[..n])?;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends what one read of `stream` returned, a record per line.
    pub fn write(&self, stream: LogStream, chunk: &[u8]) -> io::Result<()> {
        let run = self.lock().run;
        self.append(logline::split(crate::events::now_ms(), stream, run, chunk))
    }

    /// Appends records, rotating first when they would pass the limit.
    fn append(&self, records: Vec<Record>) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for r in &records {
            logline::encode(r, &mut bytes);
        }
        let mut inner = self.lock();
        // A file kept open only while the instance writes (the log is live) and the
        // budget allows; else one opened for this write alone.
        let keep = |inner: &mut Inner, o: Opened| -> Option<Opened> {
            match o {
                Opened::Kept(c) if inner.tx.is_some() => {
                    inner.file = Some(c);
                    None
                }
                other => Some(other),
            }
        };
        let mut once = None;
        if inner.file.is_none() {
            let mut o = Opened::open(&self.path)?;
            inner.size = o.file().metadata()?.len();
            once = keep(&mut inner, o);
        }
        if inner.size > 0 && inner.size + bytes.len() as u64 > self.max_bytes {
            for n in (1..self.generations).rev() {
                let from = self.generation(n);
                if from.exists() {
                    std::fs::rename(&from, self.generation(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.generation(1))?;
            inner.file = None;
            once = keep(&mut inner, Opened::open(&self.path)?);
            inner.size = 0;
        }
        // Small appends to the page cache; fast enough to do inline.
        match (inner.file.as_mut(), once.as_mut()) {
            (Some(Counted(f)), _) => f.write_all(&bytes)?,
            (None, Some(o)) => o.file().write_all(&bytes)?,
            (None, None) => return Err(io::Error::other("no log file open")),
        }
        inner.size += bytes.len() as u64;
        if let Some(tx) = &inner.tx {
            let _ = tx.send(Arc::new(records));
        }
        Ok(())
    }

    /// The log's records (those at or after `since_ms`, if given; the last `tail` lines
    /// if non-zero), oldest generation first, and, if it is still being written, a
    /// receiver for what follows.
    pub fn snapshot(&self, since_ms: Option<u64>, tail: usize) -> io::Result<Snapshot> {
        let inner = self.lock();
        let mut data = Vec::new();
        for n in (1..=self.generations).rev() {
            read_all(&self.generation(n), &mut data)?;
        }
        read_all(&self.path, &mut data)?;
        let mut records = logline::decode_all(&data);
        if let Some(t) = since_ms {
            records.retain(|r| r.time_ms >= t);
        }
        Ok(Snapshot {
            records: logline::tail_lines(records, tail),
            live: inner.tx.as_ref().map(|tx| tx.subscribe()),
        })
    }
}

/// Generation `n` of the log at `path` (`<path>.<n>`).
fn generation(path: &Path, n: u32) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// Removes a log and every rotated generation of it.
pub fn remove_log_files(path: &Path) {
    let gens = (1..).map(|n| generation(path, n));
    for p in std::iter::once(path.to_path_buf()).chain(gens) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if p != path {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("cannot remove log {}: {e}", p.display());
                if p != path {
                    return;
                }
            }
        }
    }
}

fn read_all(path: &Path, out: &mut Vec<u8>) -> io::Result<()> {
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(out)?;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where the keeper's forwarded output of an instance goes.
struct TapSink(Arc<LogFile>);

impl bulkhead_driver::OutputSink for TapSink {
    fn write(&self, stream: bulkhead_driver::Stream, data: &[u8]) {
        let stream = match stream {
            bulkhead_driver::Stream::Stdout => LogStream::Stdout,
            bulkhead_driver::Stream::Stderr => LogStream::Stderr,
        };
        if let Err(e) = self.0.write(stream, data) {
            tracing::warn!("log of {}: {e}", self.0.path.display());
        }
    }

    fn close(&self, _stream: bulkhead_driver::Stream) {
        self.0.stream_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(recs: &[Record]) -> Vec<String> {
        recs.iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    r.stream,
                    r.run,
                    String::from_utf8_lossy(&r.data)
                )
            })
            .collect()
    }

    #[test]
    fn records_carry_stream_and_run_and_rotate_through_generations() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path(), "x", 4096, 3);
        log.start_run(1, "run 1 started");
        log.write(LogStream::Stdout, b"out\n").unwrap();
        log.write(LogStream::Stderr, b"err\n").unwrap();
        let snap = log.snapshot(None, 0).unwrap();
        assert_eq!(
            text(&snap.records),
            ["bulkhead 1 run 1 started", "stdout 1 out", "stderr 1 err"]
        );
        assert_eq!(log.stderr_tail(5), ["err"]);
        let line = vec![b'a'; 999];
        for _ in 0..40 {
            let mut l = line.clone();
            l.push(b'\n');
            log.write(LogStream::Stdout, &l).unwrap();
        }
        assert!(std::fs::metadata(log.path()).unwrap().len() <= 4096);
        for n in 1..=3 {
            assert!(log.generation(n).exists(), "generation {n}");
        }
        assert!(!log.generation(4).exists(), "only 3 generations are kept");
        assert_eq!(log.snapshot(None, 2).unwrap().records.len(), 2);
        log.remove_files();
        for n in 1..=3 {
            assert!(!log.generation(n).exists());
        }
        assert!(!log.path().exists());
    }

    #[test]
    fn since_filters_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path(), "x", 1 << 20, 1);
        log.write(LogStream::Stdout, b"now\n").unwrap();
        let now = crate::events::now_ms();
        assert_eq!(
            log.snapshot(Some(now + 60_000), 0).unwrap().records.len(),
            0
        );
        assert_eq!(
            log.snapshot(Some(now - 60_000), 0).unwrap().records.len(),
            1
        );
    }
}
