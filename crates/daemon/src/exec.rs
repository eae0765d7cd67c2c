//! `bulkhead exec`: a command run in a running instance's context.
//!
//! The command gets the environment the instance's current run was spawned with (the
//! daemon's pass-through variables, the manifest's `env`, `PORT`, `BULKHEAD_*`; not
//! `NOTIFY_SOCKET`, which only the main process may use) and the instance's working
//! directory. It is a child of the daemon, spawned through the reaper registry
//! ([`bulkhead_driver::reaper::spawn`]) so that the orphan reaper never takes its status,
//! and it leads its own process group. (The sandbox driver will add the instance's
//! namespaces and cgroup.)
//!
//! The protocol is one bidirectional stream: the first request starts the command, later
//! ones carry stdin (forwarded as it comes; `stdin_eof` or the end of the request stream
//! closes the command's stdin). stdout and stderr go back as they are read, then one exit
//! status.
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

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_api::v1;
use bulkhead_core::event::ExitStatus;
use bulkhead_core::instance::State;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use bulkhead_driver::reaper;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    #[error("exec with a terminal (tty) is not supported yet")]
    Tty,
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
            ExecError::Tty => Status::unimplemented(msg),
            ExecError::NotFound(_) => Status::not_found(msg),
            ExecError::NotRunning { .. } | ExecError::Spawn { .. } => {
                Status::failed_precondition(msg)
            }
        }
    }
}

/// Starts the command of the first request and returns the response stream; the rest
/// runs in a task.
pub(crate) async fn exec(
    sh: Arc<Shared>,
    mut inbound: Streaming<v1::ExecRequest>,
) -> Result<ExecStream, Status> {
    let first = inbound.message().await?.ok_or(ExecError::NoStart)?;
    let Some(v1::exec_request::Msg::Start(start)) = first.msg else {
        return Err(ExecError::NoStart.into());
    };
    if start.tty {
        return Err(ExecError::Tty.into());
    }
    let id = InstanceId::parse(&start.id)
        .map(|(id, _)| id)
        .map_err(|e| ExecError::InvalidId {
            id: start.id.clone(),
            reason: e.to_string(),
        })?;
    let argv = start.argv;
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(ExecError::EmptyCommand.into());
    }
    if argv.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGV_BYTES {
        return Err(ExecError::CommandTooLong.into());
    }
    let slot = sh.get(&id).ok_or_else(|| ExecError::NotFound(id.clone()))?;
    let view = slot.view();
    let not_running = || ExecError::NotRunning {
        id: id.clone(),
        state: view.state.as_str(),
    };
    if !matches!(view.state, State::Starting | State::Ready) || view.pid.is_none() {
        return Err(not_running().into());
    }
    let (mut env, cwd) = slot.exec_env().ok_or_else(not_running)?;
    env.retain(|(k, _)| k != "NOTIFY_SOCKET");

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| ExecError::Spawn {
        program: argv[0].clone(),
        id: id.clone(),
        source,
    };
    let spawned = reaper::spawn(&mut cmd).map_err(spawn_err)?;
    let pipes = (|| {
        Ok::<_, std::io::Error>((
            spawned.stdin.map(pipe::Sender::from_owned_fd).transpose()?,
            spawned
                .stdout
                .map(pipe::Receiver::from_owned_fd)
                .transpose()?,
            spawned
                .stderr
                .map(pipe::Receiver::from_owned_fd)
                .transpose()?,
        ))
    })();
    let child = spawned.child;
    // On error `child` drops here: its group is killed and it is reaped.
    let (stdin, stdout, stderr) = pipes.map_err(spawn_err)?;
    tracing::debug!(instance = %id, pid = child.pid(), argv = ?argv, "exec started");

    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(supervise(id, child, inbound, stdin, stdout, stderr, tx));
    Ok(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<v1::ExecResponse, Status>>;

/// Runs one exec to its end: forwards stdin and output, then reports the exit status, or
/// kills the command when the client goes away.
async fn supervise(
    id: InstanceId,
    mut child: reaper::Child,
    inbound: Streaming<v1::ExecRequest>,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    tx: Tx,
) {
    let pid = child.pid();
    let (gone_tx, mut gone_rx) = mpsc::channel::<()>(1);
    let stdin_task = tokio::spawn(forward_stdin(inbound, stdin, gone_tx));
    let out_task = tokio::spawn(forward_output(stdout, tx.clone(), Stream::Stdout));
    let err_task = tokio::spawn(forward_output(stderr, tx.clone(), Stream::Stderr));

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
        out_task.abort();
        err_task.abort();
        tracing::debug!(instance = %id, pid, "exec killed: the client went away");
        return;
    }
    let drained = async {
        let _ = out_task.await;
        let _ = err_task.await;
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

/// Writes the client's stdin into the command's; closes it at `stdin_eof` or at the end of
/// the request stream. A broken request stream means the client is gone.
async fn forward_stdin(
    mut inbound: Streaming<v1::ExecRequest>,
    mut stdin: Option<pipe::Sender>,
    gone: mpsc::Sender<()>,
) {
    loop {
        match inbound.message().await {
            Ok(Some(v1::ExecRequest {
                msg: Some(v1::exec_request::Msg::Stdin(data)),
            })) => {
                if let Some(w) = stdin.as_mut() {
                    // The command closed its stdin or exited: drop the rest.
                    if w.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(v1::ExecRequest {
                msg: Some(v1::exec_request::Msg::StdinEof(_)),
            })) => stdin = None,
            // A second start, or an empty message: ignored.
            Ok(Some(_)) => {}
            // Half-close: no more stdin, but the client still reads.
            Ok(None) => {
                drop(stdin);
                return;
            }
            Err(_) => {
                let _ = gone.send(()).await;
                return;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Sends what the command writes, as it comes, until EOF.
async fn forward_output(r: Option<pipe::Receiver>, tx: Tx, which: Stream) {
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
