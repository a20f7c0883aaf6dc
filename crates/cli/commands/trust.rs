//! `pgtwig trust`: approve the commands this work tree's config would run
//! (`post_create`) and a non-default Neon API, list or forget approvals; and
//! the checks made before running them or sending the key. The rules live in
//! `pgtwig_core::trust`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use pgtwig_core::fsutil::ProjectLock;
use pgtwig_core::trust::{self, CommandList, RepoKey, TrustStore};

use pgtwig_project::Project;

#[derive(Args)]
pub struct TrustArgs {
    /// Show the approved command lists of this repository (and what still needs approval).
    #[arg(long, conflicts_with = "revoke")]
    list: bool,
    /// Forget every approval for this repository.
    #[arg(long)]
    revoke: bool,
}

pub fn run(args: TrustArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let repo = repo_key(&project.root)?;
    let path = trust::trust_path(&project.home);
    if args.list {
        let store = TrustStore::load(&path)?;
        list(&project, &repo, &store);
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = lock(&project)?;
    let mut store = TrustStore::load(&path)?;
    if args.revoke {
        let forgotten = store.revoke(&repo);
        store.save()?;
        if forgotten == 0 {
            println!("No commands were approved for repository {}", repo.as_str());
        } else {
            println!(
                "Forgot {forgotten} approved command list(s) for repository {}; checkouts skip them until `pgtwig trust`",
                repo.as_str()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let lists = trust::command_lists(&project.config);
    if lists.is_empty() {
        println!(
            "Nothing to approve: {} has no post_create commands",
            config_files(&project.root)
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Approving for repository {}: post_create commands run after a checkout makes a branch \
         (DATABASE_URL set to it); an api_url gets your Neon API key.",
        repo.as_str()
    );
    let mut approved = 0;
    for l in &lists {
        let new = store.approve(&repo, l, &project.root);
        approved += usize::from(new);
        print_list(l, if new { "" } else { " (already approved)" });
    }
    store.save()?;
    println!(
        "Approved {approved} command list(s){}. They hold in every work tree of this repository; \
         a changed list needs `pgtwig trust` again, `pgtwig trust --revoke` forgets.",
        match lists.len() - approved {
            0 => String::new(),
            n => format!(", {n} already were"),
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub use pgtwig_project::approval::repo_key;

fn lock(project: &Project) -> Result<ProjectLock> {
    std::fs::create_dir_all(project.home.dir())
        .with_context(|| format!("cannot create {}", project.home.dir().display()))?;
    Ok(ProjectLock::acquire(&project.home.lock_path())?)
}

fn config_files(root: &Path) -> String {
    let local = pgtwig_core::config::LOCAL_CONFIG_FILE;
    if root.join(local).is_file() {
        format!("{} (nor {local})", pgtwig_core::CONFIG_FILE)
    } else {
        pgtwig_core::CONFIG_FILE.to_string()
    }
}

fn print_list(l: &CommandList, note: &str) {
    println!(
        "  {}, {}, {}{note}:",
        l.source.file_name(),
        l.rule,
        l.kind.as_str()
    );
    for c in &l.commands {
        println!("      {c}");
    }
}

fn list(project: &Project, repo: &RepoKey, store: &TrustStore) {
    let current: Vec<String> = trust::command_lists(&project.config)
        .iter()
        .map(CommandList::hash)
        .collect();
    let approvals = store.approvals(repo);
    if approvals.is_empty() {
        println!("No commands are approved for repository {}", repo.as_str());
    } else {
        println!(
            "Approved for repository {} (in {}):",
            repo.as_str(),
            store.path().display()
        );
        for a in approvals {
            println!(
                "  {}, approved {} in {}{}:",
                a.kind,
                a.approved_at,
                a.work_tree.display(),
                if current.contains(&a.hash) {
                    " (in the current config)"
                } else {
                    ""
                }
            );
            for c in &a.commands {
                println!("      {c}");
            }
        }
    }
    let lists = trust::command_lists(&project.config);
    let pending = store.unapproved(repo, &lists);
    if !pending.is_empty() {
        println!("Not approved yet (`pgtwig trust` approves them):");
        for l in pending {
            print_list(l, "");
        }
    }
}

/// `pgtwig init` wrote the config itself: what it holds is the user's.
pub fn approve_written(project: &Project) -> Result<()> {
    let lists = trust::command_lists(&project.config);
    if lists.is_empty() {
        return Ok(());
    }
    let repo = repo_key(&project.root)?;
    let _lock = lock(project)?;
    let mut store = TrustStore::load(&trust::trust_path(&project.home))?;
    for l in &lists {
        store.approve(&repo, l, &project.root);
    }
    store.save()?;
    Ok(())
}

/// `pgtwig init` adopted a config it did not write: its commands are not
/// approved by that; say which and how.
pub fn report_unapproved(project: &Project) -> Result<()> {
    let lists = trust::command_lists(&project.config);
    let repo = repo_key(&project.root)?;
    let store = TrustStore::load(&trust::trust_path(&project.home))?;
    let pending = store.unapproved(&repo, &lists);
    if pending.is_empty() {
        return Ok(());
    }
    println!(
        "Not approved yet in this repository (post_create commands run after a checkout makes a branch):"
    );
    for l in pending {
        print_list(l, "");
    }
    println!(
        "Checkouts make branches without those commands, and a non-default api_url gets no Neon API key, \
         until you review them and run `pgtwig trust` in {}",
        project.root.display()
    );
    Ok(())
}
