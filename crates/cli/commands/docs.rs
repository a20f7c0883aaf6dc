//! What pgtwig says about itself for shells and `man`: `pgtwig completions SHELL` prints a
//! completion script (clap_complete), `pgtwig man` a man page (clap_mangen), both made from the
//! same argument definitions the commands parse with, so they cannot fall behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write pgtwig.1 and a page per subcommand (pgtwig-branch-create.1, ...) into this folder
    /// (e.g. ~/.local/share/man/man1) instead of printing pgtwig.1.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Print the completion script: `source <(pgtwig completions bash)`, or save it where the
/// shell loads completions from.
pub fn completions(args: CompletionsArgs, mut cli: clap::Command) -> Result<ExitCode> {
    clap_complete::generate(args.shell, &mut cli, "pgtwig", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs, cli: clap::Command) -> Result<ExitCode> {
    let mut cli = cli;
    cli.build();
    match args.dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cli).render(&mut out)?;
            out.flush()?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let written = write_pages(&cli, "pgtwig", &dir)?;
            println!("Wrote {written} man pages into {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cmd`'s page as `NAME.1` and one per visible subcommand (`NAME-SUB.1`, recursively), as git
/// names its pages; returns how many were written.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut text = Vec::new();
    clap_mangen::Man::new(page).render(&mut text)?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        written += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}
