//! `pgtwig`: a database branch for every git branch.
//!
//! A thin command-line layer: parse arguments (clap), find the project, call
//! the library crates, print. All behaviour lives in `pgtwig-core` and the
//! backends.

mod commands;
mod daemon_link;
mod output;
mod progress;
mod tree;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pgtwig", version, about = "A database branch for every git branch", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up pgtwig in this git repository: write .pgtwig.toml, create the root branch.
    Init(commands::init::InitArgs),
    /// Create, list, delete, reset, start and stop database branches.
    #[command(subcommand)]
    Branch(commands::branch::BranchCommand),
    /// Run the proxy: the app's fixed DATABASE_URL reaches the active branch.
    Up(commands::daemon::UpArgs),
    /// Stop the proxy (and the branches' servers, unless --keep-running).
    Down(commands::daemon::DownArgs),
    /// Make a branch the active one: new proxy connections go to it.
    Use(commands::daemon::UseArgs),
    /// Show the active branch, the proxy and its sessions.
    Status(commands::daemon::StatusArgs),
    /// Print a DATABASE_URL through the proxy with the proxy password (for other users, containers).
    Url(commands::url::UrlArgs),
    /// Print DATABASE_URL=… for this work tree (for .env files; --export for direnv and shells).
    Env(commands::env::EnvArgs),
    /// Run a command with DATABASE_URL set for this work tree: `pgtwig run -- CMD ARGS…`.
    Run(commands::env::RunArgs),
    /// Branches for pull requests (CI): pr-NUMBER.
    #[command(subcommand)]
    Pr(commands::git::PrCommand),
    /// Delete branches whose git branch is gone or whose TTL passed (--history: prune history instead).
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Remove point-in-time history (WAL archive, base snapshots) instead of branches.
        #[arg(long)]
        history: bool,
        /// With --history: what is older than this ("2h", "3d"; "0": all of it; default:
        /// history_retention).
        #[arg(long, value_name = "DURATION", requires = "history")]
        older_than: Option<String>,
    },
    /// Seed or refresh a branch (default: the root) from a real database.
    Import(commands::import::ImportArgs),
    /// Make a branch with personal data masked (rules in [anonymize] of .pgtwig.toml).
    Anonymize(commands::anonymize::AnonymizeArgs),
    /// Schema difference between two branches (exit 1 when they differ).
    Diff(commands::diff::DiffArgs),
    /// Run a migration command on a throwaway clone and report rewrites, locks and risky DDL (exit 1 on a failing rule).
    Check(commands::check::CheckArgs),
    /// Approve the commands this repository's config runs (post_create); --list, --revoke.
    Trust(commands::trust::TrustArgs),
    /// Remove pgtwig's git hook (restoring the hook that was there before).
    Uninstall,
    /// Check this machine and project: server binaries, copy-on-write, disk, port, hook, daemon.
    Doctor(commands::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(commands::docs::CompletionsArgs),
    /// Print pgtwig's man page (--dir: write one per subcommand).
    Man(commands::docs::ManArgs),
    /// Entry points for git hooks (installed by `pgtwig init`).
    #[command(subcommand, hide = true)]
    Hook(commands::git::HookCommand),
}

/// Log lines on stderr: the daemon's (which `up --detach` sends to daemon.log) carry an
/// RFC 3339 UTC timestamp, others only warn and need none; colour only on a terminal, so
/// the log file holds no escape codes.
fn init_logging(daemon: bool) {
    use std::io::IsTerminal;
    // The daemon reports what it does; other commands only warn.
    let default_level = if daemon {
        "info,tokio_postgres=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGTWIG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let format = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if daemon {
        format.with_timer(Rfc3339Utc).init();
    } else {
        format.without_time().init();
    }
}

/// `2026-12-02T01:40:00.123456Z`: RFC 3339, what log tools parse.
struct Rfc3339Utc;

impl tracing_subscriber::fmt::time::FormatTime for Rfc3339Utc {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(
            w,
            "{}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up(_)) {
        // `pgtwig status | head -1` should end quietly, as git does; the
        // daemon keeps Rust's default (ignored) so a closed socket is an
        // error, not death.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL);
        }
    }
    init_logging(matches!(cli.command, Command::Up(_)));
    let result = match cli.command {
        Command::Init(args) => commands::init::run(args),
        Command::Branch(cmd) => commands::branch::run(cmd),
        Command::Up(args) => commands::daemon::up(args),
        Command::Down(args) => commands::daemon::down(args),
        Command::Use(args) => commands::daemon::use_branch(args),
        Command::Status(args) => commands::daemon::status(args),
        Command::Url(args) => commands::url::run(args),
        Command::Env(args) => commands::env::env(args),
        Command::Run(args) => commands::env::run(args),
        Command::Pr(cmd) => commands::git::pr(cmd),
        Command::Gc {
            dry_run,
            history: true,
            older_than,
        } => commands::disk::gc_history(older_than.as_deref(), dry_run),
        Command::Gc { dry_run, .. } => commands::git::gc(dry_run),
        Command::Uninstall => commands::git::uninstall(),
        Command::Trust(args) => commands::trust::run(args),
        Command::Diff(args) => commands::diff::run(args),
        Command::Check(args) => commands::check::run(args),
        Command::Anonymize(args) => commands::anonymize::run(args),
        Command::Import(args) => commands::import::run(args),
        Command::Hook(cmd) => commands::git::hook(cmd),
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Completions(args) => commands::docs::completions(args, Cli::command()),
        Command::Man(args) => commands::docs::man(args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 2, not 1: `pgtwig diff` uses 1 for "they differ".
            ExitCode::from(2)
        }
    }
}
