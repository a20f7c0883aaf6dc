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
    let pin = args.branch.as_deref().map(BranchName::parse).transpose()?;
    let (url, database) = proxy_url(
        &project,
        &backend,
        pin.as_ref(),
        args.database.as_deref(),
        args.host.as_deref(),
    )?;
    // stderr: stdout is the URL, for `$(pgtwig url)`.
    eprintln!("pgtwig: {database}");
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}

/// Whether a daemon answers for this project, and the port it really uses (`pgtwig up
/// --port` overrides the config).
pub fn running_proxy_port(project: &Project, backend: &Backend) -> Result<Option<u16>> {
    Ok(
        match control::request(
            &backend.daemon_paths()?.control,
            &Request::Status,
            Duration::from_secs(5),
        ) {
            Ok(Response::Status(s)) => Some(
                pgtwig_core::ListenAddr::parse(&s.listen)
                    .map(|l| l.port)
                    .unwrap_or(project.config.proxy.listen.port),
            ),
            _ => None,
        },
    )
}

/// The DATABASE_URL through the proxy that any client can use (it carries the proxy
/// password), following the client's work tree's branch unless `pin`ned; and the database
/// it names.
pub fn proxy_url(
    project: &Project,
    backend: &Backend,
    pin: Option<&BranchName>,
    database: Option<&str>,
    host: Option<&str>,
) -> Result<(String, pgtwig_project::Database)> {
    let listen = &project.config.proxy.listen;
    let port = running_proxy_port(project, backend)?.unwrap_or(listen.port);
    let host = host.map(str::to_string).unwrap_or_else(|| {
        if matches!(listen.host.as_str(), "0.0.0.0" | "::") {
            "localhost".into()
        } else {
            listen.url_host()
        }
    });
    let database = project.database(database)?;
    let dbname = match pin {
        Some(b) => format!("{}@{b}", database.name),
        None => database.name.clone(),
    };
    let url = match backend {
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
            let branch = match pin {
                Some(b) => b.clone(),
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
    Ok((url, database))
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
