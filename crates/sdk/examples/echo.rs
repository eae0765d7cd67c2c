//! An example workload: reads each message of its input channel and writes it, unchanged,
//! to its output channel. `echo [INPUT] [OUTPUT]` (defaults `input`, `output`).
//!
//! Its manifest (`examples/workloads/echo-rust/manifest.yaml`):
//!
//! ```yaml
//! name: echo-rust
//! command: [../../../target/release/examples/echo]
//! readiness: {notify: true}
//! channels:
//!   inputs:  [{name: input, max_payload: 1Mi, depth: 4}]
//!   outputs: [{name: output, max_payload: 1Mi, depth: 4}]
//! ```
//!
//! The ports are opened before readiness is reported, so a host that waits for `ready`
//! can send at once. The output is written with a zero-copy loan filled from the input
//! message in place (one copy, shared memory to shared memory).

use std::time::Duration;

use bulkhead_sdk::{notify_ready, Workload};

fn main() {
    if let Err(e) = run() {
        eprintln!("echo: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args.next().unwrap_or_else(|| "input".into());
    let output = args.next().unwrap_or_else(|| "output".into());
    let w = Workload::from_env()?;
    let rx = w.input(&input)?;
    let tx = w.output(&output)?;
    notify_ready()?;
    eprintln!("echo: {input} -> {output}");
    loop {
        match rx.recv_timeout(Duration::from_millis(20))? {
            Some(msg) => {
                tx.loan(msg.len())?.write_and_send(&msg)?;
            }
            // Idle: connect late subscribers and hand them the history.
            None => tx.update_connections()?,
        }
    }
}
