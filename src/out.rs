//! Standard output for every subcommand, without the panic `println!`
//! raises when the reader went away (`shadowback status | head -c 300`).
//!
//! A write that fails (a closed pipe: `EPIPE`, or any other error) marks
//! stdout closed, and later output is dropped: the command still finishes
//! its work and its cleanup (children killed, scratch files removed), as
//! if writing to `/dev/null`, and exits with the code it would have.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set after the first failed write to stdout.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` and a newline to stdout, unless stdout already failed.
pub fn line(args: std::fmt::Arguments<'_>) {
    // Relaxed: a flag only this process's writers read; no data hangs on it.
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{args}").and_then(|()| out.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Writes `args` to stderr (progress dots, warnings); a closed stderr is
/// ignored.
pub fn err(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` that never panics: see the module docs.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// `eprint!` that never panics.
macro_rules! errout {
    ($($arg:tt)*) => {
        $crate::out::err(format_args!($($arg)*))
    };
}
pub(crate) use errout;

/// `eprintln!` that never panics.
macro_rules! errln {
    () => {
        $crate::out::err(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::err(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use errln;
