//! Integration tests: the real daemon binary, real child processes, driven through the
//! real CLI (which speaks gRPC over the Unix socket).

mod access;
mod admission;
mod basics;
mod cgroup_tracking;
mod cli_ux;
mod dataplane;
mod deps;
mod docker;
mod durability;
mod exec;
mod fds;
mod harness;
mod interop;
mod keeper_conformance;
mod keeper_shards;
mod kubernetes;
mod launch;
mod lifecycle;
mod mainpid;
mod metrics;
mod readiness;
mod recovery;
mod restart;
mod sandbox;
mod service;
mod socket_trust;
mod sockets;
mod spare;
mod state_copy;
mod supervision;
mod surface;
mod swarm;
#[allow(dead_code)]
mod swarm_support;
mod tmux;
mod top;
mod walls;
mod warm;
