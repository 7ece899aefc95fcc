//! A Go 1.19 net/http server (source in `goserver/`), built at test time
//! with Debian's Go into `target/servers/`: `SO_REUSEPORT` in
//! `net.ListenConfig.Control`, graceful `Shutdown` on `TERM`.

use std::{path::Path, process::Command, sync::Mutex};

use super::{Answerers, Server, probe_options, require, shared_tempdir, workspace_root};

const GO: &str = "/usr/bin/go";

/// Builds the server (once per test process; Go's own cache, under
/// `target/servers/`, makes later builds quick) and returns its path.
pub fn build() -> String {
    static BUILT: Mutex<Option<String>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.as_ref() {
        return path.clone();
    }
    let binary = build_source("src/servers/goserver", "goserver");
    let path = binary.display().to_string();
    *built = Some(path.clone());
    path
}

/// Builds the Go program in `source` (relative to the tests crate) with
/// Debian's Go, offline, into `target/servers/NAME`, and returns its path.
pub fn build_source(source: &str, name: &str) -> std::path::PathBuf {
    require(GO.as_ref(), "Go (Debian's golang-go)");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(source);
    let out = workspace_root().join("target/servers");
    let binary = out.join(name);
    let output = Command::new(GO)
        .current_dir(&source)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .env("GOCACHE", out.join("go-cache"))
        .env("GOPATH", out.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| panic!("run {GO} build: {e}"));
    assert!(
        output.status.success(),
        "building the Go program {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

pub fn server(addr: &str) -> Server {
    let binary = build();
    let version = Command::new(GO)
        .args(["version", &binary])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            // "PATH: go1.19.8"
            let version = text.rsplit_once(": ").map_or(text.as_ref(), |(_, v)| v);
            format!("built with {}", version.trim())
        })
        .unwrap_or_default();
    Server {
        name: "Go net/http (ListenConfig.Control SO_REUSEPORT)".into(),
        version,
        command: vec![binary, "-listen".into(), addr.into()],
        options: probe_options("TERM", addr),
        env: Vec::new(),
        answerers: Answerers::Process { threads: 1 },
        label: None,
        dir: shared_tempdir(),
    }
}
