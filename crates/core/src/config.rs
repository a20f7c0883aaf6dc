//! `.pgtwig.toml`: the project configuration, committed with the code.
//!
//! Unknown keys and bad values are errors that name the key, the line and
//! what is allowed (serde's `deny_unknown_fields` plus toml's positions).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::BranchName;

/// File name looked up from the working directory upwards, like `.git`.
pub const CONFIG_FILE: &str = ".pgtwig.toml";

/// Which system holds the database branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Managed PostgreSQL clusters on this machine, cloned copy-on-write.
    #[default]
    Local,
    /// Neon branches through Neon's API.
    Neon,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Project name: the state folder's name. Defaults to the repository's folder name.
    pub project: BranchName,
    #[serde(default)]
    pub backend: BackendKind,
    /// The branch every other branch derives from, directly or not.
    #[serde(default = "default_root")]
    pub root_branch: BranchName,
    /// The app's database, on every branch: what DATABASE_URLs name, where
    /// `import` restores to, what `diff`, `anonymize` and `post_create` use.
    /// Unset: `postgres` locally, `[neon] database` (else "neondb") on Neon —
    /// see [`Config::database`].
    #[serde(
        default,
        deserialize_with = "database_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub database: Option<String>,
    /// How far back `branch create --at` can go: WAL and base snapshots
    /// older than this are pruned ("0": keep no history).
    #[serde(default = "default_retention", with = "duration_text")]
    pub history_retention: std::time::Duration,
    /// Free space a build (`branch create`, `reset`, `import`, …) must leave on the
    /// file system of the branches, so a running branch never runs out of it
    /// ("2GiB", or "off"). Unset: 5 % of the file system, at least 1 GiB and at most 10 GiB. The
    /// environment variable `PGTWIG_FREE_SPACE_MARGIN` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_space_margin: Option<crate::size::FreeSpaceMargin>,
    /// The local proxy (`pgtwig up`).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Git branch → database branch rules, first match wins (see `rules`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map: Vec<crate::rules::MapRule>,
    /// Masking rules for `pgtwig anonymize`.
    #[serde(default, skip_serializing)]
    pub anonymize: crate::anonymize::AnonymizeConfig,
    /// Where the branches live when `backend = "neon"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neon: Option<NeonConfig>,
    /// Thresholds and rule levels of `pgtwig check`.
    #[serde(default, skip_serializing)]
    pub check: crate::check::CheckConfig,
}

/// `[neon]` in `.pgtwig.toml`: the Neon project holding the branches.
/// The API key is never here (it is a secret; `NEON_API_KEY` or neonctl's
/// credentials file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeonConfig {
    /// The Neon project id (Settings → General in the console), e.g. "cool-forest-123456".
    pub project_id: String,
    /// Neon's API; another base only for a regional or test API. Must be
    /// https (the API key goes with every request), http only on loopback.
    #[serde(default = "default_neon_api", deserialize_with = "api_url_text")]
    pub api_url: String,
    /// The role in connection strings pgtwig prints (`pr open`, `branch url`,
    /// `diff`); default: the branch's only role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The app's database on Neon, as the top-level `database` says it (an
    /// older spelling; both may be set only to the same name). Unset:
    /// "neondb", Neon's default database.
    #[serde(
        default,
        deserialize_with = "database_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub database: Option<String>,
    /// Connect here ("host:port") instead of the endpoint's own host, e.g.
    /// through an SSH tunnel. TLS still checks the endpoint's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// A PEM file of certificate authorities to trust for endpoints instead
    /// of the public ones (relative to the project folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Neon suspends a new branch's compute after this long without
    /// connections (Neon's default when unset).
    #[serde(
        default,
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub suspend_timeout: Option<std::time::Duration>,
}

/// Neon's public API, the default `api_url`.
pub const DEFAULT_NEON_API_URL: &str = "https://console.neon.tech/api/v2";

/// The database a Neon project starts with.
pub const DEFAULT_NEON_DATABASE: &str = "neondb";

/// The database of a local branch unless `.pgtwig.toml` names another.
pub const DEFAULT_LOCAL_DATABASE: &str = "postgres";

/// Check a database name for `database =`: a PostgreSQL identifier
/// (1–63 bytes), not a template (they are not for data), without `@`
/// (the proxy reads `app@branch` as a pin to a branch).
pub fn check_database_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "database \"{name}\" must be 1 to 63 bytes long (a PostgreSQL name)"
        ));
    }
    if name.contains('@') {
        return Err(format!(
            "database \"{name}\" contains '@', which the proxy reads as a branch pin (app@branch); choose a name without it"
        ));
    }
    if name.contains('\0') {
        return Err(format!("database \"{name}\" contains a NUL byte"));
    }
    if matches!(name, "template0" | "template1") {
        return Err(format!(
            "database \"{name}\" is a template database, not one for the app's data; name the app's own (e.g. \"app\")"
        ));
    }
    Ok(())
}

fn database_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    check_database_name(&text).map_err(serde::de::Error::custom)?;
    Ok(Some(text))
}

fn default_neon_api() -> String {
    DEFAULT_NEON_API_URL.into()
}

/// Refuse an `api_url` that would send the Neon API key where others can
/// read it: anything but `https://`, except `http://` to this machine
/// (127.0.0.0/8, ::1, localhost; a local stand-in or tunnel). Parsed with
/// the `url` crate, the parser reqwest itself uses, so the host checked is
/// the host connected to (`http://evil\@127.0.0.1` is evil's).
pub fn check_neon_api_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| {
        format!("api_url \"{text}\" is not a URL ({e}); write e.g. \"{DEFAULT_NEON_API_URL}\"")
    })?;
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "api_url \"{text}\" would send the Neon API key unencrypted to {}; use https:// \
                     (http:// is allowed only to this machine: 127.0.0.0/8, ::1, localhost)",
                    url.host_str().unwrap_or("no host")
                ))
            }
        }
        other => Err(format!(
            "api_url \"{text}\" must be an https:// URL (not {other}://), e.g. \"{DEFAULT_NEON_API_URL}\""
        )),
    }
}

fn api_url_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    check_neon_api_url(&text).map_err(serde::de::Error::custom)?;
    Ok(text)
}

impl NeonConfig {
    /// `[neon]` for `project_id`, everything else at its default.
    pub fn new(project_id: impl Into<String>) -> NeonConfig {
        NeonConfig {
            project_id: project_id.into(),
            api_url: default_neon_api(),
            role: None,
            database: None,
            connect: None,
            ca_file: None,
            suspend_timeout: None,
        }
    }
}

/// `.pgtwig.local.toml`: a developer's own rules, git-ignored, tried first.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalOverrides {
    #[serde(default)]
    map: Vec<crate::rules::MapRule>,
}

/// The per-developer file next to `.pgtwig.toml`.
pub const LOCAL_CONFIG_FILE: &str = ".pgtwig.local.toml";

/// What happens to open sessions when the active branch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnSwitch {
    /// Close a session at its next transaction boundary (FATAL 57P01).
    #[default]
    CloseIdle,
    /// Leave sessions on the branch they are on.
    Keep,
}

/// `[proxy]` in `.pgtwig.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Where the proxy listens: "localhost:5432" (default) is 127.0.0.1 and ::1. Anything
    /// but loopback is warned about, and its clients always need the proxy password.
    pub listen: crate::ListenAddr,
    /// Stop a branch's server after this long without sessions; "0" never.
    #[serde(with = "duration_text")]
    pub suspend_timeout: std::time::Duration,
    pub on_switch: OnSwitch,
    /// Answer SSLRequest with TLS (a certificate made locally on first use).
    /// Unset: on for the local backend, off for Neon, where SCRAM channel
    /// binding cannot cross a proxy that terminates TLS (libpq would bind
    /// to pgtwig's certificate and Neon would refuse the login); the leg to
    /// Neon is always TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// Keep a server connection that let its session in without a password
    /// for the next session with the same user, database and options, reset
    /// with `DISCARD ALL` (PgBouncer's session pooling). Off: every session
    /// gets a fresh server process (a new `pg_backend_pid()`).
    pub reuse_connections: bool,
    /// How long the proxy may take to reach a branch's server: the connect, and for a TLS
    /// upstream (Neon) the TLS handshake, each. Past it the client gets 08006 saying which;
    /// "0": no limit.
    #[serde(with = "duration_text")]
    pub connect_timeout: std::time::Duration,
    /// After traffic, keep polling this long instead of sleeping ("0", the default: never).
    /// Lowers latency where waking an idle CPU is slow, at the CPU it spins; the proxy
    /// checks on the machine that it actually makes clients faster and stops when not.
    #[serde(with = "duration_text")]
    pub busy_poll: std::time::Duration,
    /// Relay sessions that stay (past a few queries, without TLS) on io_uring where the
    /// kernel allows it: one system call per message instead of three. Off: epoll only.
    pub io_uring: bool,
    /// How many io_uring threads sessions are spread over (1 to 4, default 1). More can
    /// raise throughput with many busy sessions on contended CPUs, at more CPU per query.
    pub io_uring_threads: usize,
}

impl ProxyConfig {
    /// Whether clients may use TLS to the proxy, given the backend.
    pub fn tls_enabled(&self, backend: BackendKind) -> bool {
        self.tls.unwrap_or(backend == BackendKind::Local)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: crate::ListenAddr::localhost(5432),
            suspend_timeout: std::time::Duration::from_secs(15 * 60),
            on_switch: OnSwitch::CloseIdle,
            tls: None,
            reuse_connections: true,
            connect_timeout: std::time::Duration::from_secs(10),
            busy_poll: std::time::Duration::ZERO,
            io_uring: true,
            io_uring_threads: 1,
        }
    }
}

/// Durations written the way people write them: "15m", "90s", "1h 30m", "0".
pub(crate) mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration \"{text}\" ({e}); write e.g. \"15m\", \"90s\", \"1h\" or \"0\" for never"
            ))
        })
    }
}

/// `duration_text` for optional settings.
mod optional_duration_text {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration_text::deserialize(d).map(Some)
    }
}

fn default_retention() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

fn default_root() -> BranchName {
    BranchName::parse("main").expect("valid")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no {CONFIG_FILE} found in {start} or any parent directory; run `pgtwig init` in your git repository first"
    )]
    NotFound { start: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn new(project: BranchName) -> Config {
        Config {
            project,
            backend: BackendKind::Local,
            root_branch: default_root(),
            database: None,
            history_retention: default_retention(),
            free_space_margin: None,
            proxy: ProxyConfig::default(),
            map: Vec::new(),
            anonymize: Default::default(),
            neon: None,
            check: Default::default(),
        }
    }

    /// Parse configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if config.backend == BackendKind::Neon {
            match &config.neon {
                None => {
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message: "backend = \"neon\" needs a [neon] section with project_id = \"<your Neon project id>\" \
                                  (Settings → General in the Neon console)"
                            .into(),
                    })
                }
                Some(n) if n.project_id.trim().is_empty() => {
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message: "[neon] project_id is empty; set it to your Neon project id".into(),
                    })
                }
                Some(_) => {}
            }
        }
        if !(1..=4).contains(&config.proxy.io_uring_threads) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "[proxy] io_uring_threads = {} is out of range: it must be 1 to 4 \
                     (1, the default, costs the least CPU)",
                    config.proxy.io_uring_threads
                ),
            });
        }
        config
            .check
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        if let (Some(top), Some(neon)) = (
            &config.database,
            config.neon.as_ref().and_then(|n| n.database.as_ref()),
        ) {
            if top != neon {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "database = \"{top}\" and [neon] database = \"{neon}\" name different databases; \
                         keep one (the top-level `database` is the app's database on either backend)"
                    ),
                });
            }
        }
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Find `.pgtwig.toml` in `start` or the nearest ancestor; returns the
    /// config and the directory holding it (the project's working tree).
    pub fn discover(start: &Path) -> Result<(Config, PathBuf), ConfigError> {
        let mut dir = Some(start);
        while let Some(d) = dir {
            let candidate = d.join(CONFIG_FILE);
            if candidate.is_file() {
                let mut config = Config::load(&candidate)?;
                let local = d.join(LOCAL_CONFIG_FILE);
                if local.is_file() {
                    let text =
                        std::fs::read_to_string(&local).map_err(|source| ConfigError::Read {
                            path: local.clone(),
                            source,
                        })?;
                    let overrides: LocalOverrides =
                        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                            path: local.clone(),
                            message: e.to_string().trim_end().to_string(),
                        })?;
                    let mut map = overrides.map;
                    for rule in &mut map {
                        rule.source = crate::rules::RuleSource::Local;
                    }
                    map.append(&mut config.map);
                    config.map = map;
                }
                return Ok((config, d.to_path_buf()));
            }
            dir = d.parent();
        }
        Err(ConfigError::NotFound {
            start: start.to_path_buf(),
        })
    }

    /// The app's database: what connection strings name, where `import`
    /// restores, what `diff`, `anonymize` and `post_create` look at unless
    /// told otherwise. `database` at the top level on either backend; else
    /// `[neon] database` (default "neondb") on Neon, "postgres" locally.
    pub fn database(&self) -> &str {
        if let Some(d) = &self.database {
            return d;
        }
        match self.backend {
            BackendKind::Local => DEFAULT_LOCAL_DATABASE,
            BackendKind::Neon => self
                .neon
                .as_ref()
                .and_then(|n| n.database.as_deref())
                .unwrap_or(DEFAULT_NEON_DATABASE),
        }
    }

    /// The text `pgtwig init` writes: the settings with a comment each.
    pub fn to_commented_toml(&self) -> String {
        let backend = match self.backend {
            BackendKind::Local => "local",
            BackendKind::Neon => "neon",
        };
        let neon = self.neon.as_ref().map(neon_section).unwrap_or_default();
        let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
        // Written out locally, so the file says which database the app uses;
        // on Neon only when given (else [neon] database / "neondb" applies).
        let database = match (&self.database, self.backend) {
            (Some(d), _) => format!("database = {}\n", quoted(d)),
            (None, BackendKind::Local) => format!("database = {}\n", quoted(self.database())),
            (None, BackendKind::Neon) => String::new(),
        };
        let database = if database.is_empty() {
            database
        } else {
            format!(
                "# The app's database, on every branch: `import` restores into it, post_create and\n\
                 # `diff` / `anonymize` use it, and DATABASE_URL names it.\n{database}"
            )
        };
        format!(
            "# pgtwig: a database branch for every git branch. Commit this file.\n\
             # Docs: https://github.com/pgtwig/pgtwig#configuration\n\
             \n\
             # Names the folder holding this project's branches (under PGTWIG_HOME).\n\
             project = \"{}\"\n\
             # \"local\": PostgreSQL clusters on this machine, cloned copy-on-write; \"neon\": Neon branches.\n\
             backend = \"{backend}\"\n\
             # The branch every other branch derives from (production data, or an import of it).\n\
             root_branch = \"{}\"\n\
             {database}\
             {neon}\
             \n\
             [proxy]\n\
             # Where the app's fixed DATABASE_URL points: postgres://postgres@localhost:5432/{}\n\
             listen = \"{}\"\n\
             # Stop a branch's server after this long without sessions (\"0\" = never).\n\
             suspend_timeout = \"15m\"\n\
             # On a branch switch: \"close-idle\" ends sessions at their next transaction boundary; \"keep\" leaves them.\n\
             on_switch = \"close-idle\"\n\
             \n\
             # Git branch -> database branch, first match wins (your own rules can go first in the\n\
             # git-ignored .pgtwig.local.toml). {{branch}} is the git branch name made valid\n\
             # (feature/login -> feature-login), {{user}} your user name. Examples: examples/ in pgtwig.\n\
             [[map]]\n\
             git = \"*\"\n\
             branch = \"{{branch}}\"\n\
             parent = \"{}\"\n\
             # \"auto\": made on first checkout; \"never\": only by hand.\n\
             create = \"auto\"\n\
             # Commands run after a branch is made, with DATABASE_URL pointing at it (e.g. migrations).\n\
             post_create = []\n",
            self.project,
            self.root_branch,
            self.database(),
            self.proxy.listen,
            self.root_branch
        )
    }
}

/// The `[neon]` part of [`Config::to_commented_toml`]: every setting that differs from its
/// default, and the commonly changed ones commented out when they do not.
fn neon_section(n: &NeonConfig) -> String {
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "\n\
         [neon]\n\
         # The Neon project holding the branches. The API key comes from NEON_API_KEY\n\
         # (or `neonctl auth`), never from this file.\n\
         project_id = {}\n",
        quoted(&n.project_id)
    );
    if n.api_url != DEFAULT_NEON_API_URL {
        out += &format!(
            "# Neon's API (a regional or test one).\napi_url = {}\n",
            quoted(&n.api_url)
        );
    }
    out += "# The role in connection strings pgtwig prints (default: the branch's only role).\n";
    match &n.role {
        Some(role) => out += &format!("role = {}\n", quoted(role)),
        None => out += "# role = \"neondb_owner\"\n",
    }
    if let Some(database) = &n.database {
        out += &format!(
            "# The app's database (as the top-level `database`).\ndatabase = {}\n",
            quoted(database)
        );
    }
    if let Some(connect) = &n.connect {
        out += &format!(
            "# Reach endpoints here instead of their own hosts.\nconnect = {}\n",
            quoted(connect)
        );
    }
    if let Some(ca) = &n.ca_file {
        out += &format!(
            "# Certificate authorities to trust for endpoints.\nca_file = {}\n",
            quoted(&ca.to_string_lossy())
        );
    }
    out += "# Neon suspends a branch's compute after this long idle (default: Neon's).\n";
    match n.suspend_timeout {
        Some(d) => out += &format!("suspend_timeout = \"{}\"\n", humantime::format_duration(d)),
        None => out += "# suspend_timeout = \"5m\"\n",
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_config_reads_back() {
        let c = Config::new(BranchName::parse("shop").unwrap());
        let back = Config::parse(&c.to_commented_toml(), Path::new("x")).unwrap();
        assert_eq!(back.project, c.project);
        assert_eq!(back.proxy, c.proxy);
        assert_eq!(back.map.len(), 1);
        assert_eq!(String::from(back.map[0].branch.clone()), "{branch}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse(
            "project = \"a\"\nbackedn = \"local\"\n",
            Path::new(".pgtwig.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("backedn") && e.contains("line 2") && e.contains("backend"),
            "{e}"
        );
    }

    #[test]
    fn proxy_section_parses_durations_and_modes() {
        let c = Config::parse(
            "project = \"a\"\n[proxy]\nlisten = \"127.0.0.1:6000\"\nsuspend_timeout = \"0\"\non_switch = \"keep\"\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.proxy.listen.port, 6000);
        assert_eq!(c.proxy.suspend_timeout, std::time::Duration::ZERO);
        assert_eq!(c.proxy.on_switch, OnSwitch::Keep);
        let e = Config::parse(
            "project = \"a\"\n[proxy]\nsuspend_timeout = \"soon\"\n",
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 3") && e.contains("15m"), "{e}");
        let e = Config::parse(
            "project = \"a\"\n[proxy]\non_switch = \"close\"\n",
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("close-idle") && e.contains("keep"), "{e}");
    }

    #[test]
    fn neon_needs_its_section_and_reads_back() {
        let e = Config::parse("project = \"a\"\nbackend = \"neon\"\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[neon]") && e.contains("project_id"), "{e}");
        let e = Config::parse(
            "project = \"a\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\nrole = 3\n",
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 5") && e.contains("role"), "{e}");
        let mut c = Config::new(BranchName::parse("shop").unwrap());
        c.backend = BackendKind::Neon;
        c.neon = Some(NeonConfig::new("cool-forest-123"));
        let back = Config::parse(&c.to_commented_toml(), Path::new("x")).unwrap();
        assert_eq!(back.neon, c.neon);
        // Every setting pgtwig init (or a user) sets survives being written.
        c.neon = Some(NeonConfig {
            api_url: "http://127.0.0.1:9/api/v2".into(),
            role: Some("app_owner".into()),
            database: Some("shop".into()),
            connect: Some("127.0.0.1:5433".into()),
            ca_file: Some("certs/neon \"ca\".pem".into()),
            suspend_timeout: Some(std::time::Duration::from_secs(300)),
            ..NeonConfig::new("cool-forest-123")
        });
        let text = c.to_commented_toml();
        let back = Config::parse(&text, Path::new("x")).unwrap();
        assert_eq!(back.neon, c.neon, "{text}");
        assert!(
            !back.proxy.tls_enabled(back.backend),
            "no client TLS by default on Neon"
        );
        let c = Config::parse(
            "project = \"a\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\nsuspend_timeout = \"5m\"\n[proxy]\ntls = true\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(
            c.neon.unwrap().suspend_timeout,
            Some(std::time::Duration::from_secs(300))
        );
        assert!(c.proxy.tls_enabled(BackendKind::Neon));
        assert!(c.proxy.reuse_connections, "on unless turned off");
        let c = Config::parse(
            "project = \"a\"\n[proxy]\nreuse_connections = false\n",
            Path::new("c"),
        )
        .unwrap();
        assert!(!c.proxy.reuse_connections);
        assert_eq!(c.proxy.connect_timeout, std::time::Duration::from_secs(10));
        assert!(c.proxy.busy_poll.is_zero(), "busy-polling is opt-in");
        assert!(c.proxy.io_uring, "io_uring where the kernel allows it");
        let c = Config::parse(
            "project = \"a\"\n[proxy]\nio_uring = false\n",
            Path::new("c"),
        )
        .unwrap();
        assert!(!c.proxy.io_uring);
        assert_eq!(c.proxy.io_uring_threads, 1);
        let c = Config::parse(
            "project = \"a\"\n[proxy]\nio_uring_threads = 2\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.proxy.io_uring_threads, 2);
        for bad in ["0", "5"] {
            let e = Config::parse(
                &format!("project = \"a\"\n[proxy]\nio_uring_threads = {bad}\n"),
                Path::new("c"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("io_uring_threads") && e.contains("1 to 4"),
                "{e}"
            );
        }
        let c = Config::parse(
            "project = \"a\"\n[proxy]\nconnect_timeout = \"1500ms\"\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(
            c.proxy.connect_timeout,
            std::time::Duration::from_millis(1500)
        );
        assert!(Config::new(BranchName::parse("a").unwrap())
            .proxy
            .tls_enabled(BackendKind::Local));
    }

    #[test]
    fn neon_api_url_is_https_or_loopback_http() {
        let parse = |url: &str| {
            Config::parse(
                &format!("project = \"a\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\napi_url = \"{url}\"\n"),
                Path::new(".pgtwig.toml"),
            )
        };
        for ok in [
            "https://console.neon.tech/api/v2",
            "https://neon.example.com:8443/api/v2",
            "http://127.0.0.1:9000/api/v2",
            "http://127.8.9.10/api/v2",
            "http://[::1]:9000/api/v2",
            "http://localhost:9000/api/v2",
            "HTTP://LOCALHOST/api/v2",
        ] {
            let c = parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.neon.unwrap().api_url, ok);
        }
        for bad in [
            "http://console.neon.tech/api/v2",
            "http://10.0.0.1/api/v2",
            "http://[::2]/api/v2",
            "http://localhost.evil.example/api/v2",
            "http://127.0.0.1.evil.example/api/v2",
            // userinfo is not the host; a backslash ends the host (WHATWG, as reqwest parses it)
            "http://127.0.0.1@evil.example/api/v2",
            "http://evil.example\\\\@127.0.0.1/api/v2",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("api_url")
                    && e.contains("line 5")
                    && e.contains("unencrypted")
                    && e.contains("https://"),
                "{bad}: {e}"
            );
        }
        let e = parse("ftp://x/").unwrap_err().to_string();
        assert!(e.contains("line 5") && e.contains("https://"), "{e}");
        let e = parse("console.neon.tech").unwrap_err().to_string();
        assert!(e.contains("line 5") && e.contains("not a URL"), "{e}");
        assert!(check_neon_api_url(DEFAULT_NEON_API_URL).is_ok());
    }

    #[test]
    fn the_apps_database() {
        let parse = |text: &str| Config::parse(text, Path::new(".pgtwig.toml"));
        let c = parse("project = \"a\"\n").unwrap();
        assert_eq!(c.database(), "postgres", "nothing says otherwise");
        let c = parse("project = \"a\"\ndatabase = \"app\"\n").unwrap();
        assert_eq!(c.database(), "app");
        let neon = "project = \"a\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\n";
        assert_eq!(parse(neon).unwrap().database(), "neondb");
        let c = parse(&format!("{neon}database = \"shop\"\n")).unwrap();
        assert_eq!(c.database(), "shop");
        let c = parse(&format!("database = \"app\"\n{neon}")).unwrap();
        assert_eq!(c.database(), "app", "the top level on Neon too");
        let e = parse(&format!("database = \"app\"\n{neon}database = \"shop\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"app\"") && e.contains("\"shop\"") && e.contains("keep one"),
            "{e}"
        );
        for bad in ["", "template1", "app@main"] {
            let e = parse(&format!("project = \"a\"\ndatabase = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("line 2") && e.contains("database"), "{bad}: {e}");
        }
        // What init writes says which database, and reads back.
        let mut c = Config::new(BranchName::parse("shop").unwrap());
        let text = c.to_commented_toml();
        assert!(
            text.contains("\ndatabase = \"postgres\"\n") && text.contains("5432/postgres"),
            "{text}"
        );
        c.database = Some("app".into());
        let text = c.to_commented_toml();
        assert!(text.contains("5432/app"), "{text}");
        assert_eq!(
            Config::parse(&text, Path::new("x")).unwrap().database(),
            "app"
        );
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let e = Config::parse("project = \"a\"\nbackend = \"oracle\"\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oracle") && e.contains("local") && e.contains("neon"),
            "{e}"
        );
        let e = Config::parse("project = \"My App\"\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("uppercase"), "{e}");
    }
}
