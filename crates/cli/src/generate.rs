//! `bulkhead completions SHELL` and `bulkhead man [--dir DIR]`: generated from the same
//! clap definitions that parse the command line, so they cannot drift from it.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{self, CompletionsArgs, ManArgs};

/// Prints the completion script of `a.shell` on stdout.
pub fn completions(a: &CompletionsArgs) -> anyhow::Result<()> {
    // The raw definitions, where the connection flags are visible in every verb: `bulkhead
    // list --socket <TAB>` completes a path (the help hides them per verb, completion
    // skips hidden flags).
    let mut cmd = cli::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "bulkhead", &mut buf);
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

/// Prints bulkhead.1 on stdout, or writes every page into `--dir`.
pub fn man(a: &ManArgs) -> anyhow::Result<()> {
    // As `generate_to` does for every page: no `help` verb of clap's in the list.
    let cmd = cli::command().disable_help_subcommand(true);
    match &a.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            Ok(())
        }
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&buf)?;
            out.flush()?;
            Ok(())
        }
    }
}
