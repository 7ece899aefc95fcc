//! A real Prometheus (Debian's `prometheus` package) for the fleet tests:
//! started on loopback in the test's network namespace with a generated
//! configuration (scrape and evaluation every second) and a storage
//! directory of its own, killed with the test.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use reloader::fleet::FleetReport;

use crate::{
    instance::{decode, reloader_bin},
    wait::wait_for,
};

/// Debian's Prometheus server and its tool.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// A Prometheus scraping reloader instances.
pub struct Prometheus {
    child: Child,
    pub dir: tempfile::TempDir,
    /// Its base URL (`http://127.0.0.1:PORT` or `https://…`).
    pub url: String,
    log: PathBuf,
}

/// What Prometheus is started with besides its targets.
#[derive(Default)]
pub struct Options<'a> {
    /// `--web.config.file` content (TLS, basic auth), if any.
    pub web_config: Option<&'a str>,
    /// Rule files to load.
    pub rule_files: Vec<PathBuf>,
}

impl Prometheus {
    /// Starts Prometheus on `listen` scraping `targets` (`/metrics` of
    /// reloader instances) as job `edge`; returns once it answers.
    pub fn start(listen: &str, targets: &[&str], options: Options<'_>) -> Self {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: `cargo xtask test-deps` installs Debian's prometheus"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = options
            .rule_files
            .iter()
            .map(|r| format!("'{}'", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: edge\n    static_configs:\n      - targets: [{}]\n",
            rules.join(", "),
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let mut command = Command::new(PROMETHEUS);
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn");
        let scheme = match options.web_config {
            Some(web) => {
                let web_file = dir.path().join("web.yml");
                std::fs::write(&web_file, web).expect("write web.yml");
                command.arg(format!("--web.config.file={}", web_file.display()));
                if web.contains("tls_server_config") {
                    "https"
                } else {
                    "http"
                }
            }
            None => "http",
        };
        let output = std::fs::File::create(&log).expect("prometheus log");
        let child = command
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("log"))
            .stderr(output)
            .spawn()
            .expect("start prometheus");
        let mut prometheus = Self {
            child,
            dir,
            url: format!("{scheme}://{listen}"),
            log,
        };
        // Its API answers 503 until its storage is ready; over TLS only
        // the connection is waited for (callers poll with `try_status`).
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log_text());
            }
            if scheme == "https" {
                return std::net::TcpStream::connect(listen)
                    .map(drop)
                    .map_err(|e| e.to_string());
            }
            match crate::http::get(listen, "/-/ready") {
                Ok(answer) if answer.code == 200 => Ok(()),
                Ok(answer) => Err(format!("{answer:?}")),
                Err(e) => Err(e),
            }
        });
        prometheus
    }

    /// What Prometheus logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `reloader fleet ARGS --prometheus URL`.
    pub fn fleet(&self, args: &[&str]) -> Output {
        Command::new(reloader_bin())
            .arg("fleet")
            .args(args)
            .arg("--prometheus")
            .arg(&self.url)
            .output()
            .expect("run reloader fleet")
    }

    /// `reloader fleet status --json ARGS`, decoded.
    #[track_caller]
    pub fn fleet_status(&self, args: &[&str]) -> FleetReport {
        self.try_fleet_status(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    /// `reloader fleet status --json ARGS`, decoded, or why it failed.
    #[track_caller]
    pub fn try_fleet_status(&self, args: &[&str]) -> Result<FleetReport, String> {
        let mut all = vec!["status", "--json"];
        all.extend_from_slice(args);
        let out = self.fleet(&all);
        if !out.status.success() {
            return Err(format!(
                "fleet status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(decode("`fleet status --json`", &out.stdout))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log_text());
        }
    }
}
