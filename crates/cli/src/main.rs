//! `bulkhead`: the daemon (`serve`, `up`) and its command-line client.
//!
//! `main` only parses, dispatches and maps errors to exit codes (see [`exit`]).

mod cli;
mod client;
mod config;
mod exec;
mod exit;
mod generate;
mod output;
mod pipe;
mod serve;
mod top;

use clap::FromArgMatches;

fn main() -> std::process::ExitCode {
    // Parsed against `cli::command()`, the definitions whose help shows the connection
    // flags once (see there); the matches are the same as `Cli::parse`'s.
    let mut cmd = cli::command();
    let args = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| cli::Cli::from_arg_matches(&m))
        .unwrap_or_else(|e| e.format(&mut cmd).exit());
    // Offline verbs: no runtime, no daemon.
    let offline = match &args.command {
        cli::Command::Completions(a) => Some(generate::completions(a)),
        cli::Command::Man(a) => Some(generate::man(a)),
        _ => None,
    };
    if let Some(result) = offline {
        return match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => exit::report(e),
        };
    }
    if matches!(
        args.command,
        cli::Command::Serve(_) | cli::Command::Up(_) | cli::Command::Keeper(_)
    ) {
        // First, while single-threaded: nothing this process inherited above stderr (a
        // shell's pipe, a stray directory fd) may reach the keeper or a workload. bulkhead
        // takes no descriptor over on purpose (no socket activation). Each child also
        // closes everything above 2 before its exec; this is the second wall.
        if let Err(e) = bulkhead_driver::sys::cloexec_inherited() {
            eprintln!("bulkhead: cannot mark inherited descriptors close-on-exec: {e}");
            return exit::ERROR.into();
        }
    }
    // Also while single-threaded: take the supervisor's notify socket out of the
    // environment, so that neither the keeper nor a workload inherits it.
    let notify = if matches!(args.command, cli::Command::Serve(_) | cli::Command::Up(_)) {
        match bulkhead_daemon::notify_self::SelfNotify::take_from_env() {
            Ok(n) => n.map(std::sync::Arc::new),
            Err(e) => {
                eprintln!("bulkhead: {e}; not notifying the supervisor");
                None
            }
        }
    } else {
        None
    };
    if let cli::Command::Keeper(k) = &args.command {
        // The keeper runs no async runtime: a plain poll loop, single-threaded (the
        // instances' parent-death signal is tied to the thread that spawned them).
        return match bulkhead_driver::keeper::server::run(&k.state, k.shard) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead keeper: {e}");
                exit::ERROR.into()
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead: cannot start the async runtime: {e}");
            return exit::ERROR.into();
        }
    };
    let result = rt.block_on(run(args, notify));
    // Do not wait for lingering blocking tasks (a stdin read, a follow stream).
    rt.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => exit::report(e),
    }
}

async fn run(
    args: cli::Cli,
    notify: Option<std::sync::Arc<bulkhead_daemon::notify_self::SelfNotify>>,
) -> anyhow::Result<()> {
    use cli::Command::*;
    let given_socket = args.socket.clone();
    let socket = match &args.socket {
        Some(s) => s.clone(),
        None => config::client_socket(
            &config::Env::current(),
            &std::env::current_dir().unwrap_or_default(),
        ),
    };
    client::use_remote(&args.remote)?;
    match args.command {
        Serve(mut a) => {
            (a.tls_cert, a.tls_key) = (args.remote.tls_cert, args.remote.tls_key);
            a.socket = given_socket;
            serve::serve(*a, notify).await
        }
        Keeper(_) => unreachable!("handled before the runtime starts"),
        Up(mut a) => {
            (a.serve.tls_cert, a.serve.tls_key) = (args.remote.tls_cert, args.remote.tls_key);
            a.serve.socket = given_socket;
            serve::up(*a, notify).await
        }
        Launch(a) => client::launch(&socket, a).await,
        Get(a) => client::get(&socket, a).await,
        List(a) => client::list(&socket, a).await,
        Terminate(a) => client::terminate(&socket, a).await,
        Restart(a) => client::restart(&socket, a).await,
        Top(a) => top::top(&socket, a).await,
        Rollout(a) => client::rollout(&socket, a).await,
        Events(a) => client::events(&socket, a).await,
        Logs(a) => client::logs(&socket, a).await,
        Health(a) => client::health(&socket, a).await,
        Workloads(a) => client::workloads(&socket, a).await,
        Reload => client::reload(&socket).await,
        Release(a) => client::release(&socket, a).await,
        EndSession(a) => client::end_scope(&socket, a, true).await,
        EndNamespace(a) => client::end_scope(&socket, a, false).await,
        Exec(a) => exec::exec(&socket, a).await,
        Images(a) => client::images(&socket, a).await,
        Pipe(c) => pipe::pipe(&socket, c).await,
        Completions(_) | Man(_) => unreachable!("handled before the runtime starts"),
    }
}
