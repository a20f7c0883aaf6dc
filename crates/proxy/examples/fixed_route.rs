//! Proxies a TCP listen address to one fixed upstream, without the pgtwig daemon.
//! Used by `bench/proxy.sh`.
//!
//! ```text
//! fixed_route --listen 127.0.0.1:6543 --upstream /tmp/sock/.s.PGSQL.5433 [--runtime current|multi] [--workers N] [--tls-dir DIR] [--busy-poll-us N] [--io-uring on|off]
//! ```
//! `--upstream` is a socket file path or `host:port`; `--busy-poll-us N` turns busy-polling on
//! for N µs (default: off, as in `ProxyConfig::default()`); `--io-uring off` keeps every
//! session on epoll (default: on, as in `ProxyConfig::default()`).

use std::sync::Arc;

use pgtwig_proxy::{Proxy, ProxyConfig, Route, RouteFuture, Router, UpstreamAddr};

struct Fixed(UpstreamAddr);

impl Router for Fixed {
    fn route(&self, _pinned: Option<&str>) -> RouteFuture<'_> {
        Box::pin(async move {
            Ok(Route {
                branch: "main".to_string(),
                addr: self.0.clone(),
                lease: Box::new(()),
                follow: None,
                scope: None,
            })
        })
    }
}

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:6543".to_string();
    let mut upstream = None;
    let mut runtime = "current".to_string();
    let mut workers = 2usize;
    let mut tls_dir = None;
    let mut spin_us: Option<u64> = None;
    let mut io_uring = ProxyConfig::default().io_uring;
    let mut io_uring_threads = ProxyConfig::default().io_uring_threads;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--listen" => listen = val()?,
            "--upstream" => upstream = Some(val()?),
            "--runtime" => runtime = val()?,
            "--workers" => workers = val()?.parse()?,
            "--tls-dir" => tls_dir = Some(val()?),
            "--busy-poll-us" => spin_us = Some(val()?.parse()?),
            "--io-uring" => {
                io_uring = match val()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => anyhow::bail!("--io-uring must be on or off, not {other}"),
                }
            }
            "--io-uring-threads" => io_uring_threads = val()?.parse()?,
            _ => anyhow::bail!("unknown argument {a}"),
        }
    }
    let upstream = upstream.ok_or_else(|| anyhow::anyhow!("--upstream is required"))?;
    let addr = match upstream.rsplit_once(':') {
        Some((host, port)) if !upstream.starts_with('/') => UpstreamAddr::Tcp {
            host: host.to_string(),
            port: port.parse()?,
        },
        _ => UpstreamAddr::Unix(upstream.into()),
    };
    let rt = match runtime.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        "multi" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?,
        other => anyhow::bail!("--runtime must be current or multi, not {other}"),
    };
    let tls = tls_dir
        .map(|d| pgtwig_proxy::load_or_create_tls(std::path::Path::new(&d)))
        .transpose()?;
    rt.block_on(async move {
        let (_tx, rx) = tokio::sync::watch::channel("main".to_string());
        let proxy = Arc::new(Proxy::new(
            ProxyConfig {
                tls,
                busy_poll: match spin_us {
                    None => ProxyConfig::default().busy_poll,
                    Some(0) => None,
                    Some(us) => Some(std::time::Duration::from_micros(us)),
                },
                io_uring,
                io_uring_threads,
                ..ProxyConfig::default()
            },
            Arc::new(Fixed(addr)),
            rx,
        ));
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        eprintln!("fixed_route: listening on {listen}");
        proxy.serve(listener).await?;
        Ok(())
    })
}
