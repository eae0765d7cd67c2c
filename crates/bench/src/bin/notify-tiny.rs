//! The small workload of `cargo bench --bench sandbox -- --workload tiny`: what the bench
//! binary's `notify-child` mode does (`READY=1` to `NOTIFY_SOCKET`, then wait to be
//! stopped, or end with `BENCH_EXIT_AFTER_READY`), with nothing but std's start-up: how
//! much of each line is the program's own loading.

use std::os::unix::net::UnixDatagram;

fn main() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let s = UnixDatagram::unbound().expect("socket");
        s.send_to(b"READY=1", path).expect("notify");
    }
    if std::env::var_os("BENCH_EXIT_AFTER_READY").is_none() {
        loop {
            std::thread::park();
        }
    }
}
