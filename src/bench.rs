//! `shadowback bench …` (filled in by the benchmark module).

use std::process::ExitCode;

use clap::Subcommand;

use crate::CliError;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Block I/O: raw io_uring vs. the Xen-ring path, in one run.
    Blk,
}

pub fn run(_cmd: BenchCommand) -> Result<ExitCode, CliError> {
    Err("bench blk: not built yet".into())
}
