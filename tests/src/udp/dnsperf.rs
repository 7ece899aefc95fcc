//! dnsperf (DNS-OARC, Debian's 2.10) as the DNS load: `-Q` queries per
//! second from `-c` client sockets, each query lost when unanswered within
//! `-t` seconds. It runs until stopped: on `SIGINT` it stops sending, counts
//! queries still outstanding as "interrupted" (not lost) and prints its
//! statistics, which [`Report`] parses. Stop it at least one timeout after
//! the last event of interest, so every query that event lost was already
//! counted lost.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{dns::GEN_NAME, require};

const DNSPERF: &str = "/usr/bin/dnsperf";

/// What one dnsperf run reported.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    /// Outstanding when it was stopped (neither answered nor timed out).
    pub interrupted: u64,
    /// Answers with rcode NOERROR.
    pub noerror: u64,
    /// Its "Response codes:" line.
    pub response_codes: String,
    pub output: String,
}

impl Report {
    /// Parses dnsperf's statistics.
    pub fn parse(output: &str) -> Result<Self, String> {
        let field = |name: &str| -> Option<u64> {
            output
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        };
        let response_codes = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("Response codes:"))
            .unwrap_or("")
            .trim()
            .to_owned();
        let noerror = response_codes
            .split(',')
            .find_map(|c| c.trim().strip_prefix("NOERROR "))
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            sent: field("Queries sent:").ok_or("no \"Queries sent\" in its output")?,
            completed: field("Queries completed:")
                .ok_or("no \"Queries completed\" in its output")?,
            lost: field("Queries lost:").ok_or("no \"Queries lost\" in its output")?,
            interrupted: field("Queries interrupted:").unwrap_or(0),
            noerror,
            response_codes,
            output: output.to_owned(),
        })
    }

    /// Queries that were answered with anything but NOERROR.
    pub fn not_noerror(&self) -> u64 {
        self.completed - self.noerror.min(self.completed)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} queries sent, {} completed, {} lost, {} outstanding at the end; response codes: \
             {}",
            self.sent, self.completed, self.lost, self.interrupted, self.response_codes
        )
    }
}

/// A running dnsperf.
pub struct Dnsperf {
    child: Child,
    _dir: tempfile::TempDir,
    pub command: String,
}

impl Dnsperf {
    /// `qps` queries per second (`gen.test` TXT and A, alternating) to
    /// `addr` from `clients` sockets, each lost after `timeout`.
    pub fn start(addr: SocketAddr, qps: u32, clients: u32, timeout: Duration) -> Self {
        require(Path::new(DNSPERF), "dnsperf (Debian's dnsperf)");
        let dir = tempfile::tempdir().expect("tempdir");
        let queries = dir.path().join("queries.txt");
        std::fs::write(&queries, format!("{GEN_NAME} TXT\n{GEN_NAME} A\n")).expect("query file");
        let args: Vec<String> = vec![
            "-s".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-d".into(),
            queries.display().to_string(),
            "-Q".into(),
            qps.to_string(),
            "-c".into(),
            clients.to_string(),
            "-t".into(),
            timeout.as_secs_f64().to_string(),
            // Until stopped (at most 10 minutes).
            "-l".into(),
            "600".into(),
        ];
        let child = Command::new(DNSPERF)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {DNSPERF}: {e}"));
        Self {
            child,
            _dir: dir,
            command: format!("dnsperf {}", args.join(" ")),
        }
    }

    /// Stops it (`SIGINT`) and parses its statistics.
    pub fn finish(self) -> Report {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let out = self.child.wait_with_output().expect("wait for dnsperf");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Report::parse(&text).unwrap_or_else(|e| panic!("dnsperf: {e}; its output:\n{text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_parsed() {
        let out = "[Status] Testing complete (interruption)\n\nStatistics:\n\n  \
                   Queries sent:         399\n  Queries completed:    297 (74.44%)\n  \
                   Queries lost:         2 (0.50%)\n  Queries interrupted:  100 (25.06%)\n\n  \
                   Response codes:       NOERROR 290 (97.64%), SERVFAIL 7 (2.36%)\n";
        let r = Report::parse(out).unwrap();
        assert_eq!(
            (r.sent, r.completed, r.lost, r.interrupted, r.noerror),
            (399, 297, 2, 100, 290)
        );
        assert_eq!(r.not_noerror(), 7);
        assert!(Report::parse("nothing").is_err());
    }
}
