//! `cargo xtask dist`: the Debian package, built with cargo-deb (its
//! configuration is `[package.metadata.deb]` in reloader/Cargo.toml).
//!
//! Steps: the release binary (`--locked`); with it, a man page per command
//! (`reloader man DIR`, gzipped) and the bash, zsh and fish completions
//! (`reloader completions SHELL`) into `target/release/dist/`, where the
//! package's assets name them; then `cargo-deb --no-build`. cargo-deb is
//! installed into `target/tools` (pinned, `--locked`) when no `cargo-deb`
//! of a known major version is on `PATH`. The maintainer scripts are
//! `contrib/debian/`: no unit is restarted on upgrade (the postinst hands
//! running instances over to the new binary).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{run, workspace_root};

/// The cargo-deb this project builds its package with.
const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(clap::Args)]
pub struct DistArgs {
    /// The package's version [default: the crate's, with Debian revision
    /// 1, e.g. 0.1.0-1]; the systemd VM's upgrade test builds a second
    /// package with a higher one.
    #[arg(long, value_name = "VERSION")]
    pub deb_version: Option<String>,
    /// Directory for the .deb [default: target/debian].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the package; returns the path of the .deb.
pub fn build(args: &DistArgs) -> Result<PathBuf> {
    let root = workspace_root();
    let target = target_dir();
    let cargo_deb = cargo_deb(&target)?;
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "reloader",
    ]))?;
    let reloader = target.join("release/reloader");
    write_assets(&reloader, &target.join("release/dist"))?;
    let output = args.output.clone().unwrap_or_else(|| target.join("debian"));
    std::fs::create_dir_all(&output)?;
    let mut deb = Command::new(&cargo_deb);
    deb.current_dir(&root)
        .args(["-p", "reloader", "--no-build", "--locked", "--output"])
        .arg(&output);
    if let Some(version) = &args.deb_version {
        deb.args(["--deb-version", version]);
    }
    let out = deb
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("{}", cargo_deb.display()))?;
    ensure!(out.status.success(), "cargo-deb failed: {}", out.status);
    // cargo-deb prints the path of the package it wrote.
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo-deb named no .deb")?;
    println!("dist: {}", path.display());
    run(Command::new("dpkg-deb").arg("--info").arg(&path))?;
    run(Command::new("dpkg-deb").arg("--contents").arg(&path))?;
    Ok(path)
}

/// Man pages and completions, written by the binary they describe.
fn write_assets(reloader: &Path, dist: &Path) -> Result<()> {
    if dist.exists() {
        std::fs::remove_dir_all(dist)?;
    }
    let man = dist.join("man");
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions)?;
    let out = Command::new(reloader)
        .arg("man")
        .arg(&man)
        .output()
        .with_context(|| format!("{} man", reloader.display()))?;
    ensure!(out.status.success(), "reloader man failed: {out:?}");
    let pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    ensure!(pages.len() > 1, "reloader man wrote {} pages", pages.len());
    // -n: no name or time stamp, so the same pages give the same bytes.
    run(Command::new("gzip").args(["-9nf"]).args(&pages))?;
    for (shell, file) in [
        ("bash", "reloader.bash"),
        ("zsh", "_reloader"),
        ("fish", "reloader.fish"),
    ] {
        let out = Command::new(reloader)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("{} completions {shell}", reloader.display()))?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "reloader completions {shell} failed: {out:?}"
        );
        std::fs::write(completions.join(file), out.stdout)?;
    }
    println!(
        "dist: {} man pages, bash/zsh/fish completions in {}",
        pages.len(),
        dist.display()
    );
    Ok(())
}

/// A cargo-deb to run: one on `PATH` of the pinned major version, else the
/// pinned version installed into `target/tools` (built once).
fn cargo_deb(target: &Path) -> Result<PathBuf> {
    let major = CARGO_DEB_VERSION.split('.').next().unwrap_or_default();
    let version_of = |program: &Path| -> Option<String> {
        let out = Command::new(program).arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let usable = |version: &str| {
        version
            .split_whitespace()
            .last()
            .is_some_and(|v| v.split('.').next() == Some(major))
    };
    let installed = target.join("tools/bin/cargo-deb");
    for candidate in [PathBuf::from("cargo-deb"), installed.clone()] {
        if let Some(version) = version_of(&candidate)
            && usable(&version)
        {
            return Ok(candidate);
        }
    }
    println!(
        "dist: installing cargo-deb {CARGO_DEB_VERSION} into {}",
        target.join("tools").display()
    );
    run(Command::new(env!("CARGO"))
        .args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .arg("--root")
        .arg(target.join("tools"))
        .arg("--target-dir")
        .arg(target.join("tools-build")))?;
    ensure!(
        version_of(&installed).is_some_and(|v| usable(&v)),
        "{} does not run after its install",
        installed.display()
    );
    Ok(installed)
}
