//! `bulkhead pipe send|recv ID CHANNEL`: try an instance's data-plane channels by hand.
//!
//! The daemon says which channels the instance has (`Get`: names, directions, service
//! names, the iceoryx2 installation); the CLI then opens the channel itself, through
//! `bulkhead-sdk`, in shared memory on this machine: no message goes through the API.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use bulkhead_api::v1;
use bulkhead_sdk::{Host, Iox2};

use crate::cli::{PipeCommand, PipeRecvArgs, PipeSendArgs};
use crate::exit::{self, fail, from_status};

pub async fn pipe(socket: &Path, cmd: PipeCommand) -> anyhow::Result<()> {
    match cmd {
        PipeCommand::Send(a) => {
            let (ch, iox2) = channel(socket, &a.id, &a.channel, "input").await?;
            tokio::task::spawn_blocking(move || send(a, ch, iox2)).await?
        }
        PipeCommand::Recv(a) => {
            let (ch, iox2) = channel(socket, &a.id, &a.channel, "output").await?;
            tokio::task::spawn_blocking(move || recv(a, ch, iox2)).await?
        }
    }
}

/// Asks the daemon for the instance and finds its channel `name` of `direction`.
async fn channel(
    socket: &Path,
    id: &str,
    name: &str,
    direction: &str,
) -> anyhow::Result<(v1::Channel, Iox2)> {
    bulkhead_core::key::InstanceId::parse(id).map_err(|e| fail(exit::INVALID, e.to_string()))?;
    let mut c = crate::client::connect(socket).await?;
    let inst = c
        .get(v1::GetRequest {
            id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let ch = inst
        .channels
        .iter()
        .find(|c| c.name == name && c.direction == direction)
        .cloned()
        .ok_or_else(|| {
            let have: Vec<String> = inst
                .channels
                .iter()
                .filter(|c| c.direction == direction)
                .map(|c| c.name.clone())
                .collect();
            fail(
                exit::NOT_FOUND,
                format!(
                    "instance {id} has no {direction} channel {name:?} ({})",
                    if have.is_empty() {
                        format!("it has no {direction} channels")
                    } else {
                        format!("its {direction}s: {}", have.join(", "))
                    }
                ),
            )
        })?;
    if inst.state != "ready" && inst.state != "starting" {
        return Err(fail(
            exit::UNAVAILABLE,
            format!("instance {id} is {}: its channels are gone", inst.state),
        ));
    }
    let iox2 = Iox2 {
        prefix: inst.iox2_prefix.clone(),
        root: inst.iox2_root.clone().map(Into::into),
        space: inst.channel_space.clone().map(Into::into),
    };
    Ok((ch, iox2))
}

fn send(a: PipeSendArgs, ch: v1::Channel, iox2: Iox2) -> anyhow::Result<()> {
    let host = Host::new(&iox2).map_err(|e| fail(exit::UNAVAILABLE, e.to_string()))?;
    let publisher = host
        .publisher(&ch.service, ch.max_payload as usize)
        .map_err(|e| fail(exit::UNAVAILABLE, e.to_string()))?;
    let stdin = std::io::stdin();
    if a.whole {
        let mut buf = Vec::new();
        stdin.lock().read_to_end(&mut buf)?;
        publisher.send(&buf)?;
    } else {
        for line in stdin.lock().split(b'\n') {
            publisher.send(&line?)?;
        }
    }
    // The messages live in this publisher's memory until read (see `--linger`); late
    // subscribers get them as history meanwhile.
    let until = std::time::Instant::now() + a.linger;
    while std::time::Instant::now() < until {
        publisher.update_connections()?;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

fn recv(a: PipeRecvArgs, ch: v1::Channel, iox2: Iox2) -> anyhow::Result<()> {
    let host = Host::new(&iox2).map_err(|e| fail(exit::UNAVAILABLE, e.to_string()))?;
    let sub = host
        .subscriber(&ch.service, ch.depth as usize)
        .map_err(|e| fail(exit::UNAVAILABLE, e.to_string()))?;
    let mut out = std::io::stdout().lock();
    for i in 0..a.count {
        let Some(msg) = sub.recv_timeout(a.timeout)? else {
            return Err(fail(
                exit::TIMEOUT,
                format!(
                    "no message on {} within {} (got {i} of {})",
                    a.channel,
                    bulkhead_core::duration::format(a.timeout),
                    a.count
                ),
            ));
        };
        out.write_all(&msg)?;
        if !a.raw {
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    Ok(())
}
