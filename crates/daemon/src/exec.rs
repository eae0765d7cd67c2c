//! `bulkhead exec`: a command run in a running instance's context.
//!
//! The command gets the environment the instance's current run was spawned with (the
//! daemon's pass-through variables, the manifest's `env`, `PORT`, `BULKHEAD_*`; not
//! `NOTIFY_SOCKET`, which only the main process may use) and the instance's working
//! directory. It is a child of the daemon, spawned through the reaper registry
//! ([`bulkhead_driver::reaper::spawn_command`], which does not copy the daemon) so that
//! the orphan reaper never takes its status, and it leads its own process group. In a
//! sandboxed instance it also enters the instance's namespaces and cgroups (through a
//! relay that exits once it has cloned the command, see `spawn_command`'s `inside`) and
//! keeps only its capabilities. An
//! instance the host cannot enter (a container, a Pod) is exec'd into by its driver's
//! engine ([`bulkhead_driver::InstanceHandle::engine_exec`]: docker's exec API), with the
//! same stream protocol; a client that goes away ends that command too.
//!
//! The protocol is one bidirectional stream: the first request starts the command, later
//! ones carry stdin (forwarded as it comes; `stdin_eof` or the end of the request stream
//! closes the command's stdin). stdout and stderr go back as they are read (each in
//! order; their interleaving is not kept), then one exit status.
//!
//! With `tty` the command gets a new pseudo-terminal instead of pipes: it starts a new
//! session (so it leads its process group) with the terminal as its controlling terminal,
//! `TERM` is the client's (else the instance's, else `xterm`), the size is the client's
//! (else 24x80) and follows `resize` messages. Output then comes back as stdout only, and
//! the end of input is typed as ^D.
//!
//! Lifecycle:
//!
//! | what happens                  | what the daemon does                                       |
//! |-------------------------------|------------------------------------------------------------|
//! | the command exits             | SIGKILL to what is left of its process group (it is still unreaped, so the group is ours), reap, drain stdout/stderr (at most [`DRAIN_AFTER_EXIT`]), send the exit status |
//! | the client goes away          | SIGKILL to the command's process group, reap, nothing sent |
//!
//! A process that leaves the group (`setsid`) escapes both, as with the process driver;
//! if it keeps the output pipes open, the drain gives up after [`DRAIN_AFTER_EXIT`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_api::v1;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::instance::State;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_driver::{reaper, EngineExec, ExecRequest};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::Shared;

/// How long stdout and stderr may stay open after the command exited and the rest of its
/// process group was killed.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// At most this many bytes of argv (a request can fail, never exhaust the daemon).
const MAX_ARGV_BYTES: usize = 256 * 1024;

/// The response stream of one exec.
pub type ExecStream = ReceiverStream<Result<v1::ExecResponse, Status>>;

/// An exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the first exec message must say what to run (start)")]
    NoStart,
    #[error("exec needs a command")]
    EmptyCommand,
    #[error("exec command line is longer than {MAX_ARGV_BYTES} bytes")]
    CommandTooLong,
    #[error("invalid instance id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("no instance {0}")]
    NotFound(InstanceId),
    #[error("instance {id} is not running (state {state}); exec needs a running instance")]
    NotRunning { id: InstanceId, state: &'static str },
    #[error("cannot start {program} in instance {id}: {source}")]
    Spawn {
        program: String,
        id: InstanceId,
        #[source]
        source: std::io::Error,
    },
}

impl From<ExecError> for Status {
    fn from(e: ExecError) -> Status {
        let msg = e.to_string();
        match e {
            ExecError::NoStart
            | ExecError::EmptyCommand
            | ExecError::CommandTooLong
            | ExecError::InvalidId { .. } => Status::invalid_argument(msg),
            ExecError::NotFound(_) => Status::not_found(msg),
            ExecError::NotRunning { .. } | ExecError::Spawn { .. } => {
                Status::failed_precondition(msg)
            }
        }
    }
}

/// Starts the command of the first request and returns the response stream; the rest
/// runs in a task. `authorize` is called with the instance id (which only arrives in the
/// stream) before anything else is done with it.
pub(crate) async fn exec(
    sh: Arc<Shared>,
    mut inbound: Streaming<v1::ExecRequest>,
    authorize: impl FnOnce(&InstanceId) -> Result<(), Status> + Send,
) -> Result<ExecStream, Status> {
    let first = inbound.message().await?.ok_or(ExecError::NoStart)?;
    let Some(v1::exec_request::Msg::Start(start)) = first.msg else {
        return Err(ExecError::NoStart.into());
    };
    let id = InstanceId::parse(&start.id)
        .map(|(id, _)| id)
        .map_err(|e| ExecError::InvalidId {
            id: start.id.clone(),
            reason: e.to_string(),
        })?;
    authorize(&id)?;
    let argv = start.argv;
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(ExecError::EmptyCommand.into());
    }
    if argv.iter().map(|a| a.len() + 1).sum::<usize>() + start.term.len() > MAX_ARGV_BYTES {
        return Err(ExecError::CommandTooLong.into());
    }
    let slot = sh.get(&id).ok_or_else(|| ExecError::NotFound(id.clone()))?;
    let view = slot.view();
    let not_running = || ExecError::NotRunning {
        id: id.clone(),
        state: view.state.as_str(),
    };
    if !matches!(view.state, State::Starting | State::Ready) {
        return Err(not_running().into());
    }
    let (mut env, cwd) = slot.exec_env().ok_or_else(not_running)?;
    env.retain(|(k, _)| k != "NOTIFY_SOCKET");
    if start.tty {
        let term = if !start.term.is_empty() {
            start.term
        } else {
            let inherited = env.iter().rev().find(|(k, _)| k == "TERM");
            inherited.map_or_else(|| "xterm".to_owned(), |(_, v)| v.clone())
        };
        env.retain(|(k, _)| k != "TERM");
        env.push(("TERM".to_owned(), term));
    }

    // Drivers with a world of their own (docker, the cluster engines) run the command
    // through their engine, with the instance's own environment (and `TERM`).
    let handle = slot
        .handle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(h) = handle {
        let size = start.size.unwrap_or(DEFAULT_SIZE);
        let req = ExecRequest {
            argv: argv.clone(),
            env: env
                .iter()
                .filter(|(k, _)| k == "TERM" && start.tty)
                .cloned()
                .collect(),
            tty: start.tty.then(|| (clamp(size.rows), clamp(size.cols))),
        };
        if let Some(started) = h.engine_exec(req).await {
            let ex = started.map_err(|source| ExecError::Spawn {
                program: argv[0].clone(),
                id: id.clone(),
                source,
            })?;
            tracing::debug!(instance = %id, argv = ?argv, tty = start.tty, "exec started by the engine");
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(supervise_engine(id, ex, start.tty, inbound, tx));
            return Ok(ReceiverStream::new(rx));
        }
    }
    let spawn_err = |source| ExecError::Spawn {
        program: argv[0].clone(),
        id: id.clone(),
        source,
    };
    let mut ptmx = None;
    let how = if let Some(target) = slot.exec_target() {
        if start.tty {
            ptmx = instance_ptmx(&target);
        }
        How::Inside(target)
    } else {
        // On the host, as the instance runs: its user, groups, limits and umask.
        let setup = bulkhead_driver::setup::host_setup(&slot.spec())
            .map_err(std::io::Error::other)
            .and_then(|s| s.map(|s| s.prepare(&cwd)).transpose())
            .map_err(spawn_err)?;
        How::Host(setup)
    };
    let spawner = Spawner {
        how,
        argv: &argv,
        env: &env,
        cwd: &cwd,
    };
    let (child, io) = if start.tty {
        spawn_tty(spawner, start.size.unwrap_or(DEFAULT_SIZE), ptmx)
    } else {
        spawn_piped(spawner)
    }
    .map_err(spawn_err)?;
    tracing::debug!(instance = %id, pid = child.pid(), argv = ?argv, tty = start.tty, "exec started");

    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(supervise(id, child, inbound, io, tx));
    Ok(ReceiverStream::new(rx))
}

/// The master side of a new pseudo-terminal of the instance's own `devpts` (its
/// `/dev/pts/ptmx`), so that the command finds its terminal at its path in there (`tty`,
/// `ps`), as `docker exec -t` does. `None` when the instance has no mount namespace or
/// no `devpts` of its own there: the command then gets a host terminal, which it still
/// uses through its descriptors and `/dev/tty`.
///
/// The path is the workload's to change: it is resolved with the instance's root as `/`
/// (`RESOLVE_IN_ROOT`, no magic links), and what it names must be a `ptmx` device.
fn instance_ptmx(t: &bulkhead_driver::ExecTarget) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::fd::AsRawFd;
    if t.namespaces & libc::CLONE_NEWNS == 0 {
        return None;
    }
    let fdinfo =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", t.pidfd.as_raw_fd())).ok()?;
    let pid: u32 = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // RACE: the pid could have been reused between the read of fdinfo and the open; the
    // process the pidfd names still running after the open means it was not, and the
    // root is the instance's.
    let mut poll = [rustix::event::PollFd::new(
        &*t.pidfd,
        rustix::event::PollFlags::IN,
    )];
    if rustix::event::poll(&mut poll, Some(&rustix::event::Timespec::default())).ok()? != 0 {
        return None;
    }
    let ptmx = rustix::fs::openat2(
        &root,
        "dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let st = rustix::fs::fstat(&ptmx).ok()?;
    let is_ptmx = rustix::fs::FileType::from_raw_mode(st.st_mode)
        == rustix::fs::FileType::CharacterDevice
        && rustix::fs::major(st.st_rdev) == 5
        && rustix::fs::minor(st.st_rdev) == 2;
    // Blocking again, as a host terminal's master is opened.
    (is_ptmx && rustix::io::ioctl_fionbio(&ptmx, false).is_ok()).then_some(ptmx)
}

/// The terminal size when the client gives none.
const DEFAULT_SIZE: v1::TerminalSize = v1::TerminalSize { rows: 24, cols: 80 };

/// How the command's standard streams reach the daemon.
enum Io {
    Pipes {
        stdin: Option<pipe::Sender>,
        stdout: Option<pipe::Receiver>,
        stderr: Option<pipe::Receiver>,
    },
    /// The master side of the command's pseudo-terminal (non-blocking).
    Tty(Arc<AsyncFd<OwnedFd>>),
}

/// Where a command runs ([`reaper::spawn_command`], which never copies the daemon): on
/// the host as the instance does (its user, groups, limits and umask), or inside a
/// walled instance (its namespaces, cgroups and restrictions).
pub(crate) enum How {
    Host(Option<bulkhead_driver::setup::Prepared>),
    Inside(bulkhead_driver::ExecTarget),
}

/// A command to spawn in an instance's context (`bulkhead exec`, exec probes).
pub(crate) struct Spawner<'a> {
    pub how: How,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a std::path::Path,
}

impl Spawner<'_> {
    /// Spawns with `io` as the standard streams; the command leads its own process group
    /// (its own session, on a terminal).
    pub(crate) fn spawn(self, io: reaper::CommandIo) -> std::io::Result<reaper::SpawnedChild> {
        let (setup, inside) = match self.how {
            How::Host(setup) => (setup, None),
            How::Inside(ref target) => (None, Some(target)),
        };
        reaper::spawn_command(reaper::CommandSpec {
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            setup,
            inside,
            io,
        })
    }
}

/// Spawns with stdin, stdout and stderr on pipes, in a new process group.
fn spawn_piped(spawner: Spawner<'_>) -> std::io::Result<(reaper::Child, Io)> {
    let spawned = spawner.spawn(reaper::CommandIo::Pipes)?;
    // On error below `spawned.child` drops: its group is killed and it is reaped.
    let io = Io::Pipes {
        stdin: spawned.stdin.map(pipe::Sender::from_owned_fd).transpose()?,
        stdout: spawned
            .stdout
            .map(pipe::Receiver::from_owned_fd)
            .transpose()?,
        stderr: spawned
            .stderr
            .map(pipe::Receiver::from_owned_fd)
            .transpose()?,
    };
    Ok((spawned.child, io))
}

/// Spawns on a new pseudo-terminal (the instance's own, `ptmx`, else the host's): the
/// child starts a session (so it leads its process group) and takes the terminal as its
/// controlling terminal.
fn spawn_tty(
    spawner: Spawner<'_>,
    size: v1::TerminalSize,
    ptmx: Option<OwnedFd>,
) -> std::io::Result<(reaper::Child, Io)> {
    use rustix::pty::OpenptFlags;
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = match ptmx {
        Some(m) => m,
        None => rustix::pty::openpt(flags)?,
    };
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    set_size(&master, &size)?;
    // The slave of this very master (no path to look up, in whichever devpts it is).
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    // The slave side is the child's only (`spawn` drops the daemon's copies): reads of
    // the master end (EIO) once every process holding the terminal has closed it.
    let spawned = spawner.spawn(reaper::CommandIo::Terminal(slave))?;
    rustix::io::ioctl_fionbio(&master, true)?;
    // SAFETY: the AsyncFd takes ownership of the OwnedFd: the descriptor stays open and
    // the same until the AsyncFd drops.
    let master =
        unsafe { AsyncFd::register_with_interest(master, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
    Ok((spawned.child, Io::Tty(Arc::new(master))))
}

fn set_size(master: &OwnedFd, size: &v1::TerminalSize) -> std::io::Result<()> {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    Ok(rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: clamp(size.rows),
            ws_col: clamp(size.cols),
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?)
}

type Tx = mpsc::Sender<Result<v1::ExecResponse, Status>>;

/// Runs one exec to its end: forwards stdin and output, then reports the exit status, or
/// kills the command when the client goes away.
async fn supervise(
    id: InstanceId,
    mut child: reaper::Child,
    inbound: Streaming<v1::ExecRequest>,
    io: Io,
    tx: Tx,
) {
    let pid = child.pid();
    let (gone_tx, mut gone_rx) = mpsc::channel::<()>(1);
    let (sink, outputs) = match io {
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            stdin.map(Sink::Pipe),
            vec![
                tokio::spawn(forward_output(
                    stdout.map(Source::Pipe),
                    tx.clone(),
                    Stream::Stdout,
                )),
                tokio::spawn(forward_output(
                    stderr.map(Source::Pipe),
                    tx.clone(),
                    Stream::Stderr,
                )),
            ],
        ),
        Io::Tty(master) => (
            Some(Sink::Tty(master.clone())),
            vec![tokio::spawn(forward_output(
                Some(Source::Tty(master)),
                tx.clone(),
                Stream::Stdout,
            ))],
        ),
    };
    let stdin_task = tokio::spawn(forward_stdin(inbound, sink, gone_tx));

    let client_gone = tokio::select! {
        () = child.exited() => false,
        () = tx.closed() => true,
        Some(()) = gone_rx.recv() => true,
    };
    // The leader has exited (or is about to be killed) but is unreaped: the group's
    // number is still ours, so the signal reaches only the command's processes.
    if let Err(e) = child.signal_group(Signal::KILL) {
        tracing::warn!("{id}: cannot kill the process group of exec {pid}: {e}");
    }
    let status = child.wait().await;
    stdin_task.abort();
    if client_gone {
        for t in outputs {
            t.abort();
        }
        tracing::debug!(instance = %id, pid, "exec killed: the client went away");
        return;
    }
    let drained = async {
        for t in outputs {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(DRAIN_AFTER_EXIT, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            "{id}: exec {pid} exited but its output stayed open for {DRAIN_AFTER_EXIT:?} \
             (a process outside its group holds it); closing the stream"
        );
    }
    let msg = match status {
        Ok(st) => {
            tracing::debug!(instance = %id, pid, %st, "exec ended");
            Ok(v1::ExecResponse {
                msg: Some(v1::exec_response::Msg::Exit(exit_proto(st))),
            })
        }
        Err(e) => Err(Status::internal(format!(
            "cannot collect the exit status of exec {pid} in instance {id}: {e}"
        ))),
    };
    let _ = tx.send(msg).await;
}

fn exit_proto(st: ExitStatus) -> v1::ExitStatus {
    v1::ExitStatus {
        code: st.code(),
        signal: st.signal(),
        core_dumped: st.core_dumped(),
    }
}

/// Where the client's stdin goes.
enum Sink {
    Pipe(pipe::Sender),
    Tty(Arc<AsyncFd<OwnedFd>>),
    /// A command run by the driver's engine: its input, and its terminal's resize.
    Engine(
        std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
        Option<Box<dyn Fn(u16, u16) + Send + Sync>>,
        bool,
    ),
}

impl Sink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Pipe(w) => w.write_all(data).await,
            Sink::Engine(w, ..) => {
                w.write_all(data).await?;
                w.flush().await
            }
            Sink::Tty(fd) => {
                let mut data = data;
                while !data.is_empty() {
                    let mut guard = fd.writable().await?;
                    match guard.try_io(|f| Ok(rustix::io::write(f.get_ref(), data)?)) {
                        Ok(Ok(n)) => data = &data[n..],
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// Writes the client's stdin into the command's; at `stdin_eof` or at the end of the
/// request stream closes the pipe (or, on a terminal, types the EOF character ^D). Goes
/// on reading the request stream after that, for resizes and to notice that the client
/// is gone (a broken request stream).
async fn forward_stdin(
    mut inbound: Streaming<v1::ExecRequest>,
    mut sink: Option<Sink>,
    gone: mpsc::Sender<()>,
) {
    use v1::exec_request::Msg;
    let mut open = sink.is_some();
    loop {
        let msg = match inbound.message().await {
            Ok(Some(req)) => req.msg,
            // Half-close: no more stdin, but the client still reads.
            Ok(None) => {
                if open {
                    end_of_input(&mut sink).await;
                }
                return;
            }
            Err(_) => {
                let _ = gone.send(()).await;
                return;
            }
        };
        match msg {
            Some(Msg::Stdin(data)) if open => {
                if let Some(w) = sink.as_mut() {
                    // The command closed its stdin or exited: drop the rest.
                    if w.write_all(&data).await.is_err() {
                        open = false;
                    }
                }
            }
            Some(Msg::StdinEof(_)) if open => {
                open = false;
                end_of_input(&mut sink).await;
            }
            Some(Msg::Resize(size)) => {
                match &sink {
                    Some(Sink::Tty(fd)) => {
                        // The kernel sends SIGWINCH to the terminal's foreground group.
                        if let Err(e) = set_size(fd.get_ref(), &size) {
                            tracing::debug!("cannot resize an exec terminal: {e}");
                        }
                    }
                    Some(Sink::Engine(_, Some(resize), _)) => {
                        resize(clamp(size.rows), clamp(size.cols));
                    }
                    _ => {}
                }
            }
            // Input after its end, a second start, or an empty message: ignored.
            _ => {}
        }
    }
}

/// The end of the client's input: a pipe is closed, a terminal gets ^D (VEOF, which ends
/// input at the start of a line in canonical mode).
async fn end_of_input(sink: &mut Option<Sink>) {
    match sink {
        Some(Sink::Tty(_)) | Some(Sink::Engine(_, _, true)) => {
            if let Some(w) = sink.as_mut() {
                let _ = w.write_all(b"\x04").await;
            }
        }
        Some(Sink::Engine(w, _, false)) => {
            let _ = w.shutdown().await;
            *sink = None;
        }
        _ => *sink = None,
    }
}

fn clamp(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Runs one exec made by the driver's engine to its end, as [`supervise`] does for the
/// daemon's own: input and output forwarded, then its status; ended when the client
/// goes away.
async fn supervise_engine(
    id: InstanceId,
    ex: EngineExec,
    tty: bool,
    inbound: Streaming<v1::ExecRequest>,
    tx: Tx,
) {
    let EngineExec {
        stdin,
        mut output,
        status,
        resize,
        kill,
    } = ex;
    let (gone_tx, mut gone_rx) = mpsc::channel::<()>(1);
    let stdin_task = tokio::spawn(forward_stdin(
        inbound,
        Some(Sink::Engine(stdin, resize, tty)),
        gone_tx,
    ));
    let forward = async {
        while let Some((stream, data)) = output.recv().await {
            let msg = match stream {
                bulkhead_driver::Stream::Stdout => v1::exec_response::Msg::Stdout(data),
                bulkhead_driver::Stream::Stderr => v1::exec_response::Msg::Stderr(data),
            };
            if tx
                .send(Ok(v1::ExecResponse { msg: Some(msg) }))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    };
    let ended = tokio::select! {
        ended = forward => ended,
        () = tx.closed() => false,
        Some(()) = gone_rx.recv() => false,
    };
    stdin_task.abort();
    if !ended {
        kill();
        tracing::debug!(instance = %id, "exec killed: the client went away");
        return;
    }
    let msg = match status.await {
        Ok(st) => Ok(v1::ExecResponse {
            msg: Some(v1::exec_response::Msg::Exit(exit_proto(st))),
        }),
        Err(e) => Err(Status::internal(format!(
            "cannot collect the exit status of an exec in instance {id}: {e}"
        ))),
    };
    let _ = tx.send(msg).await;
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Where the command's output comes from.
enum Source {
    Pipe(pipe::Receiver),
    Tty(Arc<AsyncFd<OwnedFd>>),
}

impl Source {
    /// `Ok(0)` at the end: EOF on a pipe, EIO on a terminal whose slave side every
    /// process has closed.
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Pipe(r) => r.read(buf).await,
            Source::Tty(fd) => loop {
                let mut guard = fd.readable().await?;
                match guard.try_io(|f| Ok(rustix::io::read(f.get_ref(), &mut *buf)?)) {
                    Ok(Ok(n)) => return Ok(n),
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            },
        }
    }
}

/// Sends what the command writes, as it comes, until EOF.
async fn forward_output(r: Option<Source>, tx: Tx, which: Stream) {
    let Some(mut r) = r else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = buf[..n].to_vec();
        let msg = match which {
            Stream::Stdout => v1::exec_response::Msg::Stdout(data),
            Stream::Stderr => v1::exec_response::Msg::Stderr(data),
        };
        if tx
            .send(Ok(v1::ExecResponse { msg: Some(msg) }))
            .await
            .is_err()
        {
            return;
        }
    }
}
