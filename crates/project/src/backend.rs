//! The two backends behind one set of commands. `backend` in .pgtwig.toml
//! picks one; each command asks for what it needs and says clearly when a
//! command only makes sense for the other.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pgtwig_core::fsutil::ProjectLock;
use pgtwig_core::BranchName;
use pgtwig_local::LocalBackend;
use pgtwig_neon::{ApiKey, NeonBackend, NeonClient};
use pgtwig_proxy::UpstreamTls;

use crate::Project;

pub enum Backend {
    Local(LocalBackend),
    Neon(Box<Neon>),
}

/// The Neon backend and how to reach its endpoints.
pub struct Neon {
    pub backend: NeonBackend,
    /// `[neon] connect`, resolved.
    pub connect: Option<(String, u16)>,
    /// `[neon] ca_file`, made absolute.
    pub ca_file: Option<PathBuf>,
    pub role: Option<String>,
    /// The app's database (`Config::database`: `database`, else `[neon] database`, else neondb).
    pub database: String,
}

impl Project {
    /// The backend `.pgtwig.toml` names.
    pub fn backend(&self, create: bool) -> Result<Backend> {
        match self.config.backend {
            pgtwig_core::BackendKind::Local => {
                let mut b = LocalBackend::open(self.home.clone(), create)?;
                b.set_free_space_margin(self.config.free_space_margin);
                b.set_history_retention(self.config.history_retention);
                Ok(Backend::Local(b))
            }
            pgtwig_core::BackendKind::Neon => Ok(Backend::Neon(Box::new(self.neon()?))),
        }
    }

    fn neon(&self) -> Result<Neon> {
        let config = self
            .config
            .neon
            .as_ref()
            .context("backend = \"neon\" needs a [neon] section with project_id")?;
        crate::approval::require_approved_api_url(self, &config.api_url)?;
        let client = NeonClient::new(&config.api_url, ApiKey::from_environment()?);
        let mut backend = NeonBackend::new(client, &config.project_id, self.home.clone())?;
        backend.suspend_timeout = config.suspend_timeout;
        let connect = match &config.connect {
            Some(c) => Some(parse_connect(c)?),
            None => None,
        };
        Ok(Neon {
            backend,
            connect,
            ca_file: config.ca_file.as_ref().map(|p| self.root.join(p)),
            role: config.role.clone(),
            database: self.config.database().to_string(),
        })
    }
}

/// "host:port" → (host, port), checked now rather than at the first connection.
fn parse_connect(text: &str) -> Result<(String, u16)> {
    let (host, port) = text.rsplit_once(':').with_context(|| {
        format!("[neon] connect = \"{text}\" must be host:port, e.g. \"127.0.0.1:5433\"")
    })?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("[neon] connect = \"{text}\": \"{port}\" is not a port number"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        bail!("[neon] connect = \"{text}\" has no host");
    }
    Ok((host, port))
}

impl Neon {
    /// Trust roots for endpoint certificates: `ca_file`, else the public roots.
    pub fn upstream_tls(&self) -> Result<UpstreamTls> {
        match &self.ca_file {
            None => Ok(UpstreamTls::public_roots()),
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read [neon] ca_file {}", path.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.with_context(|| {
                        format!("[neon] ca_file {} is not PEM certificates", path.display())
                    })?;
                    roots.add(cert).with_context(|| {
                        format!("[neon] ca_file {}: unusable certificate", path.display())
                    })?;
                }
                if roots.is_empty() {
                    bail!("[neon] ca_file {} holds no certificates", path.display());
                }
                Ok(UpstreamTls::with_roots(roots))
            }
        }
    }

    /// A connection string with the role's password, straight to the
    /// branch's compute; with `connect` set, libpq's `hostaddr` and `port`
    /// send it there (TLS still checks the endpoint's host).
    pub fn url(&self, name: &BranchName, database: &str) -> Result<String> {
        let mut url = self
            .backend
            .connection_uri(name.as_str(), database, self.role.as_deref())?;
        let mut extra = Vec::new();
        if let Some((ip, port)) = self.connect_addr()? {
            extra.push(format!("hostaddr={ip}"));
            extra.push(format!("port={port}"));
        }
        if let Some(ca) = &self.ca_file {
            extra.push(format!("sslrootcert={}", ca.display()));
        }
        if !extra.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&extra.join("&"));
        }
        Ok(url)
    }

    /// `connect` as an IP address (libpq's hostaddr takes no names).
    fn connect_addr(&self) -> Result<Option<(std::net::IpAddr, u16)>> {
        let Some((host, port)) = &self.connect else {
            return Ok(None);
        };
        let ip = (host.as_str(), *port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| format!("cannot resolve [neon] connect host \"{host}\""))?
            .ip();
        Ok(Some((ip, *port)))
    }

    /// A blocking client to a branch's compute, over verified TLS.
    pub fn connect(
        &self,
        name: &BranchName,
        database: &str,
        app: &str,
    ) -> Result<postgres::Client> {
        let url = self
            .backend
            .connection_uri(name.as_str(), database, self.role.as_deref())?;
        let parsed: postgres::Config = url
            .parse()
            .context("Neon returned a connection string pgtwig cannot read")?;
        // Rebuilt rather than amended: the parsed URL already carries a
        // port, and `connect` replaces host address and port.
        let mut config = postgres::Config::new();
        config
            .user(parsed.get_user().unwrap_or_default())
            .dbname(parsed.get_dbname().unwrap_or(database))
            .application_name(app)
            .ssl_mode(postgres::config::SslMode::Require);
        if let Some(p) = parsed.get_password() {
            config.password(p);
        }
        for host in parsed.get_hosts() {
            if let postgres::config::Host::Tcp(h) = host {
                config.host(h);
            }
        }
        match self.connect_addr()? {
            Some((ip, port)) => {
                config.hostaddr(ip).port(port);
            }
            None => {
                config.port(parsed.get_ports().first().copied().unwrap_or(5432));
            }
        }
        let tls = self.upstream_tls()?;
        let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.0).clone());
        Ok(config.connect(connector)?)
    }
}

impl Backend {
    pub fn lock(&self) -> Result<ProjectLock> {
        Ok(match self {
            Backend::Local(b) => b.lock()?,
            Backend::Neon(n) => n.backend.lock()?,
        })
    }

    pub fn exists(&self, name: &BranchName) -> Result<bool> {
        Ok(match self {
            Backend::Local(b) => b.exists(name),
            Backend::Neon(n) => n.backend.exists(name.as_str())?,
        })
    }

    /// A connection string straight to branch `name` (not through the
    /// proxy); a local branch's server is started first.
    pub fn url(&self, name: &BranchName, database: &str) -> Result<String> {
        match self {
            Backend::Local(b) => {
                b.start(name)?;
                Ok(b.url(name, database)?)
            }
            Backend::Neon(n) => n.url(name, database),
        }
    }

    /// Make `name` from `parent` as it is now, noting the git branch it is
    /// for and when it expires (RFC 3339; Neon deletes it then, locally
    /// `gc` does). Returns how it was made, for messages. A branch that
    /// already exists is an error [`already_exists`] recognizes.
    pub fn create(
        &self,
        name: &BranchName,
        parent: &BranchName,
        git_branch: Option<String>,
        expires: Option<String>,
    ) -> Result<String> {
        self.create_recorded(name, parent, git_branch, expires, false)
    }

    /// [`create`](Self::create), recording in the branch's metadata that the rule that
    /// made it protects it: `gc` then keeps it whatever `.pgtwig.toml` is checked out later.
    pub fn create_recorded(
        &self,
        name: &BranchName,
        parent: &BranchName,
        git_branch: Option<String>,
        expires: Option<String>,
        protected: bool,
    ) -> Result<String> {
        Ok(match self {
            Backend::Local(b) => b
                .create_recorded(name, parent, git_branch, expires, protected)?
                .branch
                .meta
                .clone_method
                .describe()
                .to_string(),
            Backend::Neon(n) => {
                n.backend.create_recorded(
                    name.as_str(),
                    parent.as_str(),
                    pgtwig_neon::PointInTime::Head,
                    git_branch,
                    expires,
                    protected,
                )?;
                "Neon branch".to_string()
            }
        })
    }

    /// Delete branch `name`; never `root` (both backends refuse it).
    pub fn delete(&self, name: &BranchName, root: &BranchName) -> Result<()> {
        match self {
            Backend::Local(b) => b.delete(name, root)?,
            Backend::Neon(n) => n.backend.delete(name.as_str(), root.as_str())?,
        }
        Ok(())
    }

    /// An error for a command that has no meaning on this backend.
    pub fn local_only(&self, what: &str, why: &str) -> Result<&LocalBackend> {
        match self {
            Backend::Local(b) => Ok(b),
            Backend::Neon(_) => {
                bail!(
                    "{what} works with the local backend only; this project uses Neon, where {why}"
                )
            }
        }
    }
}

/// Whether `e` is [`Backend::create`] finding the name taken.
pub fn already_exists(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<pgtwig_local::Error>(),
        Some(pgtwig_local::Error::Exists { .. })
    ) || matches!(
        e.downcast_ref::<pgtwig_neon::NeonError>(),
        Some(pgtwig_neon::NeonError::Exists { .. })
    )
}
