//! Debian's nginx as a managed server: one config per generation, so each
//! answers `gen=N pid=P` and the tests can tell generations apart.

use std::path::Path;

/// An nginx setup in a temporary directory.
pub struct Nginx {
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Configs for generations 1..=`generations`, listening on `addr` with
    /// `reuseport`.
    pub fn new(addr: &str, generations: u64) -> Self {
        Self::with_directives(addr, generations, "", "")
    }

    /// As [`Nginx::new`], with extra directives in the main context
    /// (`worker_shutdown_timeout 1s;`) and in every generation's `http`
    /// block (`keepalive_requests 100;`).
    pub fn with_directives(addr: &str, generations: u64, main: &str, http: &str) -> Self {
        Self::configured(addr, generations, "daemon off;\n", main, http)
    }

    /// As [`Nginx::new`], for an nginx that daemonizes (no `daemon off;`:
    /// the process started forks its master into the background and exits).
    pub fn daemonizing(addr: &str, generations: u64) -> Self {
        Self::configured(addr, generations, "", "", "")
    }

    fn configured(addr: &str, generations: u64, daemon: &str, main: &str, http: &str) -> Self {
        assert!(
            Path::new("/usr/sbin/nginx").exists(),
            "nginx is not installed: run `cargo xtask test` (it installs nginx-light)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "{daemon}master_process on;\nworker_processes 2;\nerror_log stderr notice;\n\
                 {main}events {{ worker_connections 1024; }}\n"
            ),
        )
        .unwrap();
        // One http block per generation, included through `-g`.
        for g in 1..=generations {
            std::fs::write(
                dir.path().join(format!("gen-{g}.conf")),
                format!(
                    "http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                     proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                     uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  {http}server {{\n    \
                     listen {addr} reuseport;\n    location / {{ return 200 \"gen={g} pid=$pid\\n\"; }}\n  \
                     }}\n}}\n"
                ),
            )
            .unwrap();
        }
        Self { dir }
    }

    /// The server command for `reloader run` (with `{generation}`).
    pub fn command(&self) -> Vec<String> {
        let d = self.dir.path().display();
        vec![
            "/usr/sbin/nginx".into(),
            "-c".into(),
            format!("{d}/nginx.conf"),
            "-g".into(),
            format!("pid {d}/nginx-{{generation}}.pid; include {d}/gen-{{generation}}.conf;"),
        ]
    }
}
