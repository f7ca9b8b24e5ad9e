//! Command output on stdout. A reader that stops early (`steward audit |
//! head`) closes the pipe; `println!` would then panic. Output written
//! through [`outln!`] or [`text`] instead ends the command quietly with
//! status 0: the reader has what it wanted.

use std::fmt;
use std::io::{self, Write};

/// Writes one line to stdout (see the module documentation).
macro_rules! outln {
    () => {
        $crate::cli::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// One line on stdout; exits as [`exit_code`] says if it cannot be written.
pub(crate) fn line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let written = write_line(&mut out, args);
    finish(written);
}

/// Text on stdout as it is (no newline added), flushed.
pub(crate) fn text(s: &str) {
    let mut out = io::stdout().lock();
    let written = out.write_all(s.as_bytes()).and_then(|()| out.flush());
    finish(written);
}

fn write_line(out: &mut impl Write, args: fmt::Arguments<'_>) -> io::Result<()> {
    out.write_fmt(args)?;
    out.write_all(b"\n")
}

fn finish(written: io::Result<()>) {
    if let Err(e) = written {
        std::process::exit(exit_code(&e));
    }
}

/// The exit status after a failed write: 0 for a closed pipe, 1 (with a
/// message on stderr) for anything else, e.g. a full disk.
fn exit_code(e: &io::Error) -> i32 {
    if e.kind() == io::ErrorKind::BrokenPipe {
        0
    } else {
        eprintln!("error: cannot write the output: {e}");
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that went away after `room` bytes.
    struct ClosedAfter {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for ClosedAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() >= self.room {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let n = buf.len().min(self.room - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_ends_quietly_other_errors_fail() {
        let mut out = ClosedAfter {
            room: 6,
            got: Vec::new(),
        };
        write_line(&mut out, format_args!("a {}", 1)).unwrap();
        let e = write_line(&mut out, format_args!("more")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(out.got, b"a 1\nmo");
        assert_eq!(exit_code(&e), 0);
        assert_eq!(exit_code(&io::Error::other("no space left on device")), 1);
    }
}
