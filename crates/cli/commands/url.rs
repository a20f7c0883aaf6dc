//! `pgtwig url`: a DATABASE_URL through the proxy that works for any client — another OS user,
//! a container, a tool pgtwig cannot identify — because it carries the proxy password.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use pgtwig_core::BranchName;
use pgtwig_daemon::control::{self, Request, Response};

use crate::daemon_link::DaemonOf;
use pgtwig_project::Backend;
use pgtwig_project::Project;

#[derive(Args)]
pub struct UrlArgs {
    /// Pin the URL to this branch (database `DB@BRANCH`) instead of following the active one.
    branch: Option<String>,
    /// Database in the URL (default: the project's).
    #[arg(long)]
    database: Option<String>,
    /// Host in the URL, e.g. host.docker.internal for a container (default: where the proxy
    /// listens).
    #[arg(long)]
    host: Option<String>,
}

pub fn run(args: UrlArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let listen = &project.config.proxy.listen;
    // The port the daemon really uses (`pgtwig up --port` overrides the config).
    let port = match control::request(
        &backend.daemon_paths()?.control,
        &Request::Status,
        Duration::from_secs(5),
    ) {
        Ok(Response::Status(s)) => pgtwig_core::ListenAddr::parse(&s.listen)
            .map(|l| l.port)
            .unwrap_or(listen.port),
        _ => listen.port,
    };
    let host = args.host.clone().unwrap_or_else(|| {
        if matches!(listen.host.as_str(), "0.0.0.0" | "::") {
            "localhost".into()
        } else {
            listen.url_host()
        }
    });
    let database = project.database(args.database.as_deref())?;
    // stderr: stdout is the URL, for `$(pgtwig url)`.
    eprintln!("pgtwig: {database}");
    let dbname = match &args.branch {
        Some(b) => format!("{}@{}", database.name, BranchName::parse(b)?),
        None => database.name.clone(),
    };
    let url = match &backend {
        Backend::Local(_) => {
            let password = pgtwig_core::proxy_password::load_or_create(&project.home)
                .map_err(anyhow::Error::msg)?;
            format!(
                "postgres://postgres:{password}@{host}:{port}/{}",
                encode(&dbname)
            )
        }
        Backend::Neon(_) => {
            // Neon checks logins itself: its role and password pass through the proxy.
            let branch = match &args.branch {
                Some(b) => BranchName::parse(b)?,
                None => {
                    pgtwig_core::state::ProjectState::load(&project.home.state_path())
                        .map_err(anyhow::Error::msg)?
                        .active
                }
            };
            let direct = backend.url(&branch, &database.name)?;
            let credentials = direct
                .split_once("://")
                .and_then(|(_, rest)| rest.rsplit_once('@'))
                .map(|(creds, _)| creds.to_string())
                .unwrap_or_else(|| "ROLE:PASSWORD".into());
            format!("postgres://{credentials}@{host}:{port}/{}", encode(&dbname))
        }
    };
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a URL path segment (RFC 3986 unreserved characters stay).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn pins_are_encoded() {
        assert_eq!(super::encode("app@feature-x"), "app%40feature-x");
        assert_eq!(super::encode("a b/c"), "a%20b%2Fc");
    }
}
