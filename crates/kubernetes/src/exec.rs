//! Exec through the Pod's `exec` subresource (a websocket, kube's `ws` feature).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::AttachParams;
use tokio::io::AsyncReadExt;

use crate::handle::PodHandle;
use crate::pod::CONTAINER;

/// What a command run in the Pod left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit code (the API reports no signal: a killed command is 128 + n).
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Exec could not run.
#[derive(Debug, thiserror::Error)]
#[error("cannot exec in {pod}: {reason}")]
pub struct ExecError {
    pub pod: String,
    pub reason: String,
}

/// The exit code in the status the API sends at the end of an exec: `Success` is 0, a
/// `NonZeroExitCode` failure carries the code as its `ExitCode` cause.
pub fn exit_code(status: &Status) -> Option<i32> {
    if status.status.as_deref() == Some("Success") {
        return Some(0);
    }
    status
        .details
        .as_ref()?
        .causes
        .iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))?
        .message
        .as_deref()?
        .parse()
        .ok()
}

impl PodHandle {
    /// [`InstanceHandle::engine_exec`](bulkhead_driver::InstanceHandle::engine_exec):
    /// `bulkhead exec` through the exec subresource, streamed both ways (the environment
    /// is the container's; `req.env` cannot be added by the API and only `TERM` is ever
    /// asked, which the terminal sets).
    pub async fn exec_streams(
        &self,
        req: bulkhead_driver::ExecRequest,
    ) -> std::io::Result<bulkhead_driver::EngineExec> {
        use bulkhead_driver::{EngineExec, Stream};
        let tty = req.tty.is_some();
        let ap = AttachParams::default()
            .container(CONTAINER)
            .stdin(true)
            .stdout(true)
            .stderr(!tty)
            .tty(tty);
        let mut p = self
            .api
            .exec(&self.name, req.argv, &ap)
            .await
            .map_err(|e| {
                std::io::Error::other(format!("cannot exec in {}: {e}", self.describe()))
            })?;
        let stdin = p
            .stdin()
            .ok_or_else(|| std::io::Error::other("the exec has no stdin"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        for (stream, r) in [(Stream::Stdout, p.stdout()), (Stream::Stderr, p.stderr())] {
            let Some(mut r) = r else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 || tx.send((stream, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let status = p.take_status();
        let pod = self.describe();
        let status = Box::pin(async move {
            let st = match status {
                Some(s) => s.await,
                None => None,
            };
            let st = st.ok_or_else(|| {
                std::io::Error::other(format!("exec in {pod}: the API sent no exit status"))
            })?;
            let code = exit_code(&st).ok_or_else(|| {
                std::io::Error::other(format!(
                    "exec in {pod}: {}",
                    st.message
                        .unwrap_or_else(|| "the command failed to run".into())
                ))
            })?;
            Ok(bulkhead_core::event::ExitStatus::Exited { code })
        });
        let resize = p.terminal_size().map(|tx| {
            let tx = std::sync::Mutex::new(tx);
            Box::new(move |height: u16, width: u16| {
                let mut tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                let _ = tx.try_send(kube::api::TerminalSize { width, height });
            }) as Box<dyn Fn(u16, u16) + Send + Sync>
        });
        if let (Some(r), Some((rows, cols))) = (resize.as_ref(), req.tty) {
            r(rows, cols);
        }
        // The websocket task ends with the process: aborting it closes the connection,
        // and the kubelet ends the command when its streams go.
        let kill = Box::new(move || p.abort()) as Box<dyn FnOnce() + Send>;
        Ok(EngineExec {
            stdin: Box::pin(stdin),
            output: rx,
            status,
            resize,
            kill,
        })
    }

    /// Runs `argv` in the Pod's container, collecting its output.
    pub async fn exec(&self, argv: Vec<String>) -> Result<ExecOutput, ExecError> {
        let fail = |reason: String| ExecError {
            pod: self.describe(),
            reason,
        };
        let ap = AttachParams::default()
            .container(CONTAINER)
            .stdin(false)
            .stdout(true)
            .stderr(true);
        let mut p = self
            .api
            .exec(&self.name, argv, &ap)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut out = p.stdout();
        let mut err = p.stderr();
        let status = p.take_status();
        let read = |r: Option<tokio::io::ReadHalf<tokio::io::SimplexStream>>| async move {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v).await;
            }
            v
        };
        let (stdout, stderr) = tokio::join!(read(out.take()), read(err.take()));
        let st = match status {
            Some(s) => s.await,
            None => None,
        };
        let _ = p.join().await;
        let st = st.ok_or_else(|| fail("the API sent no exit status".into()))?;
        let code = exit_code(&st).ok_or_else(|| {
            fail(
                st.message
                    .unwrap_or_else(|| "the command failed to run".into()),
            )
        })?;
        Ok(ExecOutput {
            code,
            stdout,
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_comes_from_the_exec_status() {
        // The shapes the API server sends on the error channel (meta/v1 Status).
        let ok: Status = serde_json::from_value(serde_json::json!({
            "metadata": {}, "status": "Success"
        }))
        .unwrap();
        assert_eq!(exit_code(&ok), Some(0));
        let failed: Status = serde_json::from_value(serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}
        }))
        .unwrap();
        assert_eq!(exit_code(&failed), Some(3));
        let broken: Status = serde_json::from_value(serde_json::json!({
            "metadata": {}, "status": "Failure", "message": "container not found"
        }))
        .unwrap();
        assert_eq!(exit_code(&broken), None);
    }
}
