//! `bulkhead exec ID -- CMD [ARGS...]`: runs a command in a running instance's context.
//!
//! stdin is forwarded as it is read (end of input closes the command's stdin), stdout and
//! stderr are written as they arrive, and the CLI exits with the command's exit code, or
//! 128+N when signal N killed it (the signal is printed to stderr). Errors before the
//! command runs use the usual exit codes (see `exit`). If the CLI goes away (Ctrl-C), the
//! daemon kills the command's process group.
//!
//! With `-t` the command runs on a pseudo-terminal the daemon allocates (its output all
//! comes back as stdout, with the terminal's `\r\n`); when stdin is a terminal it is put
//! in raw mode for the duration (keys, Ctrl-C included, go to the command) and restored
//! after, and the window size is sent at the start and on every SIGWINCH.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use bulkhead_api::v1;
use bulkhead_api::v1::exec_request::Msg as In;
use bulkhead_api::v1::exec_response::Msg as Out;
use bulkhead_core::key::InstanceId;
use bulkhead_core::signal::Signal;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::ExecArgs;
use crate::client::connect;
use crate::exit::{self, fail, from_status};

/// Bytes per stdin message.
const STDIN_CHUNK: usize = 32 * 1024;

pub async fn exec(socket: &Path, a: ExecArgs) -> anyhow::Result<()> {
    InstanceId::parse(&a.id).map_err(|e| fail(exit::INVALID, e.to_string()))?;
    let mut c = connect(socket).await?;

    let (tx, rx) = mpsc::channel::<v1::ExecRequest>(8);
    tx.send(request(In::Start(v1::ExecStart {
        id: a.id.clone(),
        argv: a.command,
        tty: a.tty,
        size: a.tty.then(local_size).flatten(),
        term: if a.tty {
            std::env::var("TERM").unwrap_or_default()
        } else {
            String::new()
        },
    })))
    .await
    .context("cannot queue the exec request")?;
    let resizes = a.tty.then(|| tokio::spawn(forward_resizes(tx.clone())));
    // Restored when dropped, on every path out of here.
    let raw = if a.tty { RawMode::enable()? } else { None };
    // A plain thread: a blocking read of stdin must not hold up the runtime, and it may
    // never return (an idle terminal); `main` does not wait for it.
    std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || forward_stdin(&tx))
        .context("cannot start the stdin reader")?;

    let mut responses = c
        .exec(ReceiverStream::new(rx))
        .await
        .map_err(from_status)?
        .into_inner();
    let mut status = None;
    while let Some(msg) = responses.message().await.map_err(from_status)? {
        match msg.msg {
            Some(Out::Stdout(data)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)?;
                out.flush()?;
            }
            Some(Out::Stderr(data)) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&data)?;
                err.flush()?;
            }
            Some(Out::Exit(st)) => status = Some(st),
            None => {}
        }
    }
    if let Some(r) = resizes {
        r.abort();
    }
    drop(raw);
    let status = status
        .with_context(|| format!("the daemon ended exec in {} without an exit status", a.id))?;
    match (status.code, status.signal) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(exit::silent(u8::try_from(code).unwrap_or(exit::ERROR))),
        (None, Some(sig)) => {
            let name =
                Signal::from_number(sig).map_or_else(|| format!("signal {sig}"), |s| s.name());
            let core = if status.core_dumped {
                " (core dumped)"
            } else {
                ""
            };
            eprintln!("bulkhead: command killed by {name} ({sig}){core}");
            Err(exit::silent(u8::try_from(128 + sig).unwrap_or(exit::ERROR)))
        }
        (None, None) => Err(fail(
            exit::ERROR,
            format!("the daemon sent an empty exit status for exec in {}", a.id),
        )),
    }
}

fn request(msg: In) -> v1::ExecRequest {
    v1::ExecRequest { msg: Some(msg) }
}

/// Reads stdin until its end, sending each chunk; then says end of input and ends the
/// request stream.
fn forward_stdin(tx: &mpsc::Sender<v1::ExecRequest>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx
                    .blocking_send(request(In::Stdin(buf[..n].to_vec())))
                    .is_err()
                {
                    return; // the exec is over
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("bulkhead: cannot read stdin: {e}; closing the command's stdin");
                break;
            }
        }
    }
    let _ = tx.blocking_send(request(In::StdinEof(true)));
}

/// This terminal's size, when stdout or stdin is one.
fn local_size() -> Option<v1::TerminalSize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(v1::TerminalSize {
        rows: u32::from(ws.ws_row),
        cols: u32::from(ws.ws_col),
    })
}

/// Sends the new size on every SIGWINCH, until aborted.
async fn forward_resizes(tx: mpsc::Sender<v1::ExecRequest>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some(size) = local_size() {
            if tx.send(request(In::Resize(size))).await.is_err() {
                return;
            }
        }
    }
}

/// stdin in raw mode (no line editing, no echo, no signals from keys), restored on drop.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    /// `None` when stdin is not a terminal (piped input stays as it is).
    fn enable() -> anyhow::Result<Option<RawMode>> {
        use rustix::termios::{isatty, tcgetattr, tcsetattr, OptionalActions};
        let stdin = std::io::stdin();
        if !isatty(&stdin) {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin).context("cannot read the terminal settings of stdin")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
