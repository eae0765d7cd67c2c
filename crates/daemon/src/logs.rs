//! Per-instance logs: the instance's stdout and stderr, merged in arrival order, written
//! to `<state>/logs/<instance id>.log`, size-bounded by rotation to one `.1` file.
//!
//! Output comes either from pipes the daemon drains here (sandbox, docker, `--no-keeper`)
//! or forwarded by the keeper ([`bulkhead_driver::OutputTap`]; the daemon then holds no
//! pipe). Followers get what is on disk, then live chunks, without a gap: both are taken
//! under the writer's lock.
//!
//! **Descriptors.** A log's file stays open while its instance writes, so that appends
//! cost one system call, but only for the first [`open_file_budget`] logs: past that, a
//! log opens its file for each write and closes it again (10,000 chatty instances must
//! not need 10,000 descriptors).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;

/// The default size at which a log rotates.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;

pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    open_streams: AtomicUsize,
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
    tx: Option<broadcast::Sender<Vec<u8>>>,
}

/// What a reader gets: the bytes on disk and, while the log is open, a live receiver.
pub struct Snapshot {
    pub data: Vec<u8>,
    pub live: Option<broadcast::Receiver<Vec<u8>>>,
}

impl LogFile {
    /// The log of an instance. Nothing is opened until an instance writes to it.
    pub fn new(dir: &Path, stem: &str, max_bytes: u64) -> LogFile {
        LogFile {
            path: dir.join(format!("{stem}.log")),
            max_bytes: max_bytes.max(4096),
            inner: Mutex::new(Inner {
                file: None,
                size: 0,
                tx: None,
            }),
            open_streams: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the log and its rotated generation: the instance is forgotten.
    pub fn remove_files(&self) {
        for p in [self.path.clone(), self.rotated()] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove log {}: {e}", p.display());
                }
            }
        }
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Starts draining the given pipe read ends. The log is live until all of them reach
    /// end of file.
    pub fn attach(self: &Arc<Self>, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        {
            let mut inner = self.lock();
            if inner.tx.is_none() {
                inner.tx = Some(broadcast::channel(256).0);
            }
        }
        for fd in fds {
            self.open_streams.fetch_add(1, Ordering::SeqCst);
            let log = self.clone();
            tokio::spawn(async move {
                if let Err(e) = log.pump(fd).await {
                    tracing::warn!("log of {}: {e}", log.path.display());
                }
                log.stream_ended();
            });
        }
    }

    /// Takes the output the keeper forwards for this instance. The log is live until
    /// both streams end.
    pub fn attach_tap(self: &Arc<Self>, tap: &bulkhead_driver::OutputTap) {
        {
            let mut inner = self.lock();
            if inner.tx.is_none() {
                inner.tx = Some(broadcast::channel(256).0);
            }
        }
        self.open_streams.fetch_add(2, Ordering::SeqCst);
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
        }
    }

    async fn pump(&self, fd: OwnedFd) -> io::Result<()> {
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            self.write(&buf[..n])?;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk, rotating first when it would pass the limit.
    pub fn write(&self, chunk: &[u8]) -> io::Result<()> {
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
        if inner.size > 0 && inner.size + chunk.len() as u64 > self.max_bytes {
            std::fs::rename(&self.path, self.rotated())?;
            inner.file = None;
            once = keep(&mut inner, Opened::open(&self.path)?);
            inner.size = 0;
        }
        // Small appends to the page cache; fast enough to do inline.
        match (inner.file.as_mut(), once.as_mut()) {
            (Some(Counted(f)), _) => f.write_all(chunk)?,
            (None, Some(o)) => o.file().write_all(chunk)?,
            (None, None) => return Err(io::Error::other("no log file open")),
        }
        inner.size += chunk.len() as u64;
        if let Some(tx) = &inner.tx {
            let _ = tx.send(chunk.to_vec());
        }
        Ok(())
    }

    /// The log's content (the last `tail` bytes if non-zero) and, if it is still being
    /// written, a receiver for what follows.
    pub fn snapshot(&self, tail: u64) -> io::Result<Snapshot> {
        let inner = self.lock();
        let mut data = Vec::new();
        let cur_len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if tail == 0 || tail > cur_len {
            let want_prev = if tail == 0 { u64::MAX } else { tail - cur_len };
            read_tail(&self.rotated(), want_prev, &mut data)?;
        }
        read_tail(
            &self.path,
            if tail == 0 { u64::MAX } else { tail },
            &mut data,
        )?;
        Ok(Snapshot {
            data,
            live: inner.tx.as_ref().map(|tx| tx.subscribe()),
        })
    }
}

/// Where the keeper's forwarded output of an instance goes.
struct TapSink(Arc<LogFile>);

impl bulkhead_driver::OutputSink for TapSink {
    fn write(&self, _stream: bulkhead_driver::Stream, data: &[u8]) {
        if let Err(e) = self.0.write(data) {
            tracing::warn!("log of {}: {e}", self.0.path.display());
        }
    }

    fn close(&self, _stream: bulkhead_driver::Stream) {
        self.0.stream_ended();
    }
}

fn read_tail(path: &Path, tail: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if tail < len {
        f.seek(SeekFrom::Start(len - tail))?;
    }
    f.read_to_end(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_reads_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path(), "x", 4096);
        let line = vec![b'a'; 1000];
        for _ in 0..10 {
            log.write(&line).unwrap();
        }
        let cur = std::fs::metadata(log.path()).unwrap().len();
        assert!(cur <= 4096);
        assert!(log.rotated().exists());
        let all = log.snapshot(0).unwrap().data;
        assert!(
            all.len() as u64 <= 8192 && all.len() >= 4096,
            "{}",
            all.len()
        );
        assert_eq!(log.snapshot(1500).unwrap().data.len(), 1500);
        assert!(log.snapshot(0).unwrap().live.is_none());
    }
}
