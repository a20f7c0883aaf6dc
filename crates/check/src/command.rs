//! Running the user's command: its output passed through to stderr (stdout stays pgtwig's,
//! for `--json`) with the last lines kept for the error, and signals meant for pgtwig passed
//! on to it, so that an interrupted check still stops its clone and removes it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// How many of the command's last lines a failure shows.
pub const TAIL_LINES: usize = 20;

static CHILD: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn pass_on(sig: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe.
        unsafe {
            nix::libc::kill(pid, sig);
        }
    }
}

pub struct Finished {
    pub status: ExitStatus,
    pub tail: Vec<String>,
    /// pgtwig got SIGINT, SIGTERM or SIGHUP while the command ran.
    pub interrupted: bool,
}

/// Run `argv` in `dir` with `env` added; waits for it whatever signal pgtwig gets (passing
/// it on), so the caller can clean up afterwards.
pub fn run(argv: &[OsString], dir: &Path, env: &[(&str, String)]) -> Result<Finished, String> {
    let (program, args) = argv.split_first().ok_or("no command given after `--`")?;
    // One pipe for both, as `2>&1` would: the last lines keep the order they were written in.
    let (output, writer) =
        std::io::pipe().map_err(|e| format!("making a pipe for the command's output: {e}"))?;
    let writer_too = writer
        .try_clone()
        .map_err(|e| format!("making a pipe for the command's output: {e}"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_too);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let handler = SigAction::new(
        SigHandler::Handler(pass_on),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let signals = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];
    let mut previous = Vec::new();
    for s in signals {
        // SAFETY: the handler only stores atomics and calls kill(2).
        previous.push((s, unsafe { signal::sigaction(s, &handler) }.ok()));
    }
    let result = (|| {
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", Path::new(program).display()))?;
        CHILD.store(child.id() as i32, Ordering::SeqCst);
        // Our copies of the write end go, so the pipe ends when the command (and whatever
        // it started that kept its output) is done.
        drop(cmd);
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let pump = {
            let tail = tail.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(output);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    let _ = std::io::stderr().write_all(&line);
                    let mut t = tail.lock().unwrap();
                    t.push_back(String::from_utf8_lossy(&line).trim_end().to_string());
                    if t.len() > TAIL_LINES {
                        t.pop_front();
                    }
                    line.clear();
                }
            })
        };
        let status = child
            .wait()
            .map_err(|e| format!("waiting for the command: {e}"))?;
        CHILD.store(0, Ordering::SeqCst);
        let _ = pump.join();
        let tail = tail.lock().unwrap().iter().cloned().collect();
        Ok(Finished {
            status,
            tail,
            interrupted: INTERRUPTED.load(Ordering::SeqCst),
        })
    })();
    for (s, old) in previous {
        if let Some(old) = old {
            // SAFETY: restoring what was there before.
            unsafe {
                let _ = signal::sigaction(s, &old);
            }
        }
    }
    result
}
