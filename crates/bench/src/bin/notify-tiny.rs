//! The small workload of `cargo bench --bench sandbox -- --workload tiny`: the benches'
//! `notify-child` mode ([`bulkhead_bench::notify_child`]) in a program of its own, with
//! nothing but std's start-up: how much of each line is the program's own loading.

fn main() {
    bulkhead_bench::notify_child();
}
