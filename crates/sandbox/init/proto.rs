//! What the sandbox's init (`init/main.rs`, a static executable) and the driver share:
//! the descriptors the init is given, and the records of its status pipe. Std only: this
//! file is compiled into both.

/// The status pipe (the init writes [`RECORD`]s).
pub const FD_STATUS: i32 = 0;
/// The control pipe (the driver writes `0` or a new main process's pid, 4 bytes).
pub const FD_CTL: i32 = 1;
/// The `go` pipe: one byte once the init runs and its title is set (the workload process
/// waits for it before its exec).
pub const FD_GO: i32 = 2;
/// A warm slot's title pipe (length, then the instance's title), read at the hand-over;
/// not open in a cold spawn.
pub const FD_TITLE: i32 = 3;
/// The variable that names the main process (`W`, a pid of the namespace).
pub const ENV_MAIN: &str = "BULKHEAD_INIT_MAIN=";
/// The room of the init's command line: its title is written over it, the rest NUL.
pub const TITLE_ROOM: usize = 256;

/// A record on the status pipe is this long: the pid (in the instance's namespace) of
/// the main process that ended and its raw wait status (or [`LOST`]), native-endian.
pub const RECORD: usize = 8;

/// The status of a main process that ended as another process's child (its parent
/// reaped it): unknown.
pub const LOST: i32 = -1;

/// `waitid`'s `si_code` values for a child's end.
pub const CLD_EXITED: i32 = 1;
pub const CLD_DUMPED: i32 = 3;

/// The raw wait status (as `wait4` gives it) of a child's end as `waitid` reports it.
pub fn wait_status(code: i32, status: i32) -> i32 {
    match code {
        CLD_EXITED => (status & 0xff) << 8,
        CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    }
}

/// The warm slot's waiter (the same program, with [`ENV_WAIT`] in its environment): the
/// error pipe, the hand-over pipe, the `go` pipe and the listening sockets' pair, at
/// these descriptors (stdio at 0-2 already the instance's).
pub const WAIT_ERR: i32 = 3;
pub const WAIT_HANDOVER: i32 = 4;
pub const WAIT_GO: i32 = 5;
pub const WAIT_FDS: i32 = 6;
pub const ENV_WAIT: &str = "BULKHEAD_WAIT=1";
/// The manifest's `nofile` (`<soft> <hard>`), which the waiter sets right before its exec:
/// until then its process keeps at least [`WAIT_NOFILE`] descriptors' room.
pub const ENV_WAIT_NOFILE: &str = "BULKHEAD_WAIT_NOFILE=";
pub const WAIT_NOFILE: u64 = 64;
/// The waiter could not set the manifest's `nofile`.
pub const STAGE_WAIT_NOFILE: u32 = 23;

/// The error pipe's stages the waiter reports (`(stage, errno)` records, native-endian;
/// the driver's numbering).
pub const STAGE_EXEC: u32 = 13;
pub const STAGE_LISTEN: u32 = 18;
pub const STAGE_WAITING: u32 = 19;
pub const STAGE_HANDOVER: u32 = 20;

/// A hand-over: `[strings length, argc, envc, listening sockets]` (native-endian `u32`s),
/// then hostname, working directory, program, argv, environment, each NUL-terminated; at
/// most these.
pub const HANDOVER_HEADER: usize = 16;
pub const HANDOVER_BYTES: usize = 256 << 10;
pub const HANDOVER_STRINGS: usize = 16 << 10;
pub const HANDOVER_FDS: usize = 16;
