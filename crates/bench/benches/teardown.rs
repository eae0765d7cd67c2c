//! `cargo bench -p bulkhead-bench --bench teardown`: what an exec costs in a process that
//! is a copy of a larger one made without exec, as a warm slot's waiting process is a copy
//! of the daemon (issue #18).
//!
//! This process touches N MiB of memory, forks a child that waits on a pipe, then (the
//! clock running) tells it to exec `/bin/true` and waits for the end of a close-on-exec
//! pipe: the exec is past the point where the old memory is gone. With `dirty`, the parent
//! rewrites its memory between the fork and the signal, so that the child alone holds the
//! old pages and must free them (a slot that waited while the daemon ran). The baseline is
//! the same from a 4 MiB process. Single-threaded: the child only reads, execs and exits.
//!
//! Options: `--iterations N` (default 200), `--write PATH` (also write the markdown).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bulkhead_bench::{ms, ratio, Samples};

fn pipe(cloexec: bool) -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let flags = if cloexec {
        rustix::pipe::PipeFlags::CLOEXEC
    } else {
        rustix::pipe::PipeFlags::empty()
    };
    Ok(rustix::pipe::pipe_with(flags)?)
}

/// One sample: fork, then time the child's exec (see the module docs).
fn once(mem: &mut [u8], dirty: bool, prog: &std::ffi::CStr) -> anyhow::Result<Duration> {
    let (done_r, done_w) = pipe(true)?;
    let (go_r, go_w) = pipe(false)?;
    let argv = [prog.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: this process has one thread; the child only calls read, execve and _exit
    // on buffers made before the fork.
    let pid = unsafe { libc::fork() };
    anyhow::ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, on descriptors and buffers we own.
        unsafe {
            let mut b = 0u8;
            libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop((go_r, done_w));
    if dirty {
        for b in mem.iter_mut().step_by(4096) {
            *b = b.wrapping_add(1);
        }
    }
    let t = Instant::now();
    rustix::io::write(&go_w, b"g")?;
    let mut b = [0u8; 1];
    // End of file: the child's exec closed its end (or it exited).
    let _ = rustix::io::read(&done_r, &mut b);
    let took = t.elapsed();
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    anyhow::ensure!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "the child did not exec /bin/true (status {st})"
    );
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| bulkhead_bench::flag(&args, name);
    let iterations: usize = flag("--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let prog = c"/bin/true";
    let sizes = [4usize, 64, 256];
    let mut lines = Vec::new();
    for &mib in &sizes {
        let mut mem = vec![1u8; mib << 20];
        for dirty in [false, true] {
            let mut s = Samples::new(format!(
                "exec from a copy of a {mib} MiB process{}",
                if dirty {
                    ", rewritten after the fork"
                } else {
                    ""
                }
            ));
            for _ in 0..iterations {
                s.values.push(once(&mut mem, dirty, prog)?);
            }
            lines.push(s);
        }
        std::hint::black_box(&mem);
    }
    let base = lines[0].p50();
    let mut report = format!(
        "{iterations} samples each\n\n| measurement | p50 ms | p99 ms | p50 vs 4 MiB |\n|---|---|---|---|\n"
    );
    for s in &lines {
        report.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            ratio(s.p50(), base)
        ));
    }
    println!("{report}");
    if let Some(path) = flag("--write") {
        std::fs::write(path, &report)?;
    }
    Ok(())
}
