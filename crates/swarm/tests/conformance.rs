//! The driver conformance suite against the swarm driver, on the real multi-node swarm
//! of `.ci/setup-swarm.sh` (each test prints why it skips when the swarm is missing).
//! Checks that cannot apply to a task on another node skip with the reason printed.

mod common;

use bulkhead_driver::conformance;

macro_rules! checks {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $check() {
            let d = match common::driver(stringify!($check)).await {
                Ok(d) => d,
                Err(why) => {
                    eprintln!("skipped: {why}");
                    return;
                }
            };
            conformance::$check(&d, &common::fixture()).await;
        }
    )*};
}

checks!(
    exit_code_fidelity,
    signal_fidelity,
    stop_graceful,
    stop_escalates_after_grace,
    grandchildren_die_with_group,
    setsid_descendant_dies_with_instance,
    wait_is_shared,
    signal_after_exit_is_ok,
    environment_is_the_specs,
    working_directory_is_the_specs,
    stdout_is_captured,
    no_descriptor_is_inherited,
    spawn_error_is_reported,
    missing_program_is_an_exec_error_naming_it,
);

#[test]
fn crash_detection() {
    eprintln!(
        "skipped: a swarm task has no host pid for the daemon to kill (the check needs one); \
         crash detection is tested by killing the task's container (tests/swarm.rs, \
         it::swarm)"
    );
}
