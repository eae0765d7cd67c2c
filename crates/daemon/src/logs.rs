//! Per-instance logs: the instance's stdout and stderr, merged in arrival order, written
//! to `<state>/logs/<instance id>.log`, size-bounded by rotation to one `.1` file.
//!
//! The daemon holds the read ends of the instance's pipes and drains them here. (A daemon
//! crash closes those pipes; the keeper process of the supervision work will hold them
//! instead.) Followers get what is on disk, then live chunks, without a gap: both are
//! taken under the writer's lock.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

struct Inner {
    file: Option<File>,
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
                if log.open_streams.fetch_sub(1, Ordering::SeqCst) == 1 {
                    // Last stream closed: followers see the end, and the file is closed
                    // (a finished instance, kept for `get` and `logs`, holds no
                    // descriptor; a next run's output opens it again).
                    let mut inner = log.lock();
                    inner.tx = None;
                    inner.file = None;
                }
            });
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
        if inner.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            inner.size = f.metadata()?.len();
            inner.file = Some(f);
        }
        if inner.size > 0 && inner.size + chunk.len() as u64 > self.max_bytes {
            std::fs::rename(&self.path, self.rotated())?;
            inner.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
            inner.size = 0;
        }
        // Small appends to the page cache; fast enough to do inline.
        if let Some(f) = inner.file.as_mut() {
            f.write_all(chunk)?;
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
