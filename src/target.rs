//! Where a command's work goes: the queue itself, or the daemon that holds it.
//!
//! sled lets one process hold a database. A command (`queue`, `import`, `reconcile`) first
//! tries to open the queue; if it is free the daemon is stopped and the command works on the
//! database directly. If it is locked, the daemon runs, and the command asks it over HTTP:
//! ingest endpoints on `ingest.listen` (through loopback when the daemon listens on every
//! address, with the ingest token), the admin API on the admin socket in `data_dir` (its
//! file permissions are the credential) or, where there is none, on `ingest.listen` with the
//! token. Clients never go through a proxy: `HTTP_PROXY` would carry the token off the
//! machine. This module is the only place that makes that choice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, Secret};
use crate::queue::{Backend, QueueError};

pub enum Target {
    /// The daemon is stopped: the queue, opened by this process.
    Database(Arc<dyn Backend>),
    /// The daemon runs and holds the queue: its HTTP API.
    Daemon(Daemon),
}

/// How to reach the running daemon.
pub struct Daemon {
    /// `http://ADDR` of `ingest.listen`, loopback when that is every address.
    base: String,
    token: Option<Secret>,
    admin_socket: Option<PathBuf>,
    /// Why the queue could not be opened (it names the lock), for messages.
    pub locked: QueueError,
}

impl Target {
    /// The queue if no daemon holds it, else the daemon; any other failure to open it is
    /// an error naming `data_dir`.
    pub async fn open(config: &Config) -> anyhow::Result<Target> {
        match crate::daemon::open_queue_if_free(config).await {
            Ok(queue) => Ok(Target::Database(queue)),
            Err(locked @ QueueError::Locked { .. }) => {
                Ok(Target::Daemon(Daemon::of(config, locked)))
            }
            Err(e) => Err(e)
                .with_context(|| format!("cannot open the queue in {}", config.data_dir.display())),
        }
    }

    /// What the work went through, for the command's last line.
    pub fn describe(&self) -> &'static str {
        match self {
            Target::Database(_) => "database (daemon stopped)",
            Target::Daemon(_) => "running daemon",
        }
    }
}

impl Daemon {
    fn of(config: &Config, locked: QueueError) -> Daemon {
        let mut addr = config.ingest.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let socket = config.data_dir.join(crate::daemon::ADMIN_SOCKET);
        Daemon {
            base: format!("http://{addr}"),
            token: config.ingest.token.clone(),
            admin_socket: socket.exists().then_some(socket),
            locked,
        }
    }

    /// The URL of an ingest endpoint (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A client for the ingest endpoints, with a timeout per request or none.
    pub fn client(&self, timeout: Option<Duration>) -> reqwest::Result<reqwest::Client> {
        let builder = reqwest::Client::builder().no_proxy();
        match timeout {
            Some(t) => builder.timeout(t),
            None => builder,
        }
        .build()
    }

    /// `request` with the ingest token, if one is set.
    pub fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t.expose()),
            None => request,
        }
    }

    /// A client for the admin API, its base URL, and where it is (for messages): the admin
    /// socket if the daemon made one, else `ingest.listen`.
    pub fn admin(&self, timeout: Duration) -> reqwest::Result<Admin> {
        match &self.admin_socket {
            Some(socket) => Ok(Admin {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .unix_socket(socket.as_path())
                    .build()?,
                base: "http://localhost/v1/admin/queue".into(),
                place: socket.display().to_string(),
                token: None,
            }),
            None => Ok(Admin {
                client: self.client(Some(timeout))?,
                base: self.url("/v1/admin/queue"),
                place: self.url("/v1/admin/queue"),
                token: self.token.clone(),
            }),
        }
    }
}

/// The admin API of the running daemon (`Daemon::admin`).
pub struct Admin {
    client: reqwest::Client,
    base: String,
    /// The socket's path or the URL, for messages.
    pub place: String,
    /// Needed over TCP only.
    token: Option<Secret>,
}

impl Admin {
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.get(format!("{}{path}", self.base)))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.post(format!("{}{path}", self.base)))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t.expose()),
            None => request,
        }
    }
}
