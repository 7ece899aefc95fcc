//! The eBPF toolchain, build and reproducibility check.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{run, workspace_root};

/// Debian's rust-web compiler: the one with a prebuilt `core` for bpf.
const RUSTC: &str = "/usr/bin/rustc";
const CARGO: &str = "/usr/bin/cargo";
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    // llvm-sys links these when building bpf-linker against llvm-22.
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// The committed object, relative to the workspace root.
pub const OBJECT: &str = "reloader/ebpf/steer.bpf.o";
const TARGET: &str = "bpfel-unknown-none";
const BIN: &str = "reloader-steer";

/// Installs the Debian packages of `packages` that are missing.
pub fn install_apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("apt packages {}: present", packages.join(" "));
    } else {
        println!("apt packages: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

pub fn install_toolchain() -> Result<()> {
    install_apt(APT_PACKAGES)?;
    ensure!(
        Path::new(BPF_CORE).is_dir(),
        "{BPF_CORE} is missing after installing libstd-rust-web-dev-bpf"
    );

    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => println!("bpf-linker {v}: present"),
        found => {
            println!(
                "bpf-linker: {} -> building {BPF_LINKER_VERSION} against {LLVM_PREFIX}",
                found.as_deref().unwrap_or("absent")
            );
            run(Command::new(stable_cargo())
                .args(["install", "--locked", "--force", "bpf-linker", "--version"])
                .arg(BPF_LINKER_VERSION)
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX))?;
        }
    }
    Ok(())
}

pub fn build() -> Result<()> {
    let root = workspace_root();
    let object = build_into(&root, &root.join("target/ebpf"))?;
    let dest = root.join(OBJECT);
    fs::copy(&object, &dest)
        .with_context(|| format!("failed to copy {} to {}", object.display(), dest.display()))?;
    let bytes = fs::read(&dest)?;
    println!(
        "wrote {OBJECT}: {} bytes, sha256 {}",
        bytes.len(),
        sha256(&dest)?
    );
    Ok(())
}

pub fn check() -> Result<()> {
    let root = workspace_root();
    let scratch = std::env::temp_dir().join(format!("reloader-check-ebpf-{}", std::process::id()));
    let result = (|| {
        let object = build_into(&root, &scratch)?;
        let built = fs::read(&object)?;
        let committed =
            fs::read(root.join(OBJECT)).with_context(|| format!("failed to read {OBJECT}"))?;
        if built != committed {
            bail!(
                "{OBJECT} does not match its source: the rebuilt object has {} bytes (sha256 {}), \
                 the committed one {} bytes (sha256 {}). Run `cargo xtask build-ebpf` and commit \
                 the object.",
                built.len(),
                sha256(&object)?,
                committed.len(),
                sha256(&root.join(OBJECT))?
            );
        }
        println!(
            "{OBJECT} matches its source ({} bytes, sha256 {})",
            built.len(),
            sha256(&object)?
        );
        Ok(())
    })();
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// Builds the program with target dir `target_dir`; returns the object path.
fn build_into(root: &Path, target_dir: &Path) -> Result<PathBuf> {
    ensure!(
        Path::new(RUSTC).exists() && Path::new(BPF_CORE).is_dir(),
        "the eBPF toolchain is missing: run `cargo xtask ebpf-toolchain` (Debian only)"
    );
    let linker = bpf_linker_path()
        .context("bpf-linker is not installed: run `cargo xtask ebpf-toolchain` (Debian only)")?;
    let mut cmd = Command::new(CARGO);
    // A clean environment: the outer (rustup) cargo exports RUSTC,
    // RUSTUP_TOOLCHAIN, CARGO_* and flags that must not leak into this
    // build, and anything machine-specific would make the bytes differ.
    cmd.env_clear()
        .current_dir(root)
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .args(["build", "--locked", "--release", "-p", "reloader-ebpf"])
        .args(["--bin", BIN, "--target", TARGET, "--target-dir"])
        .arg(target_dir);
    run(&mut cmd)?;
    Ok(target_dir.join(TARGET).join("release").join(BIN))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`.
fn bpf_linker_path() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let path = home.join("bin/bpf-linker");
    path.exists().then_some(path)
}

fn bpf_linker_version() -> Option<String> {
    let output = Command::new(bpf_linker_path()?)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// The rustup cargo that runs this xtask (not Debian's).
fn stable_cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn sha256(path: &Path) -> Result<String> {
    let output = Command::new("sha256sum").arg(path).output()?;
    ensure!(
        output.status.success(),
        "sha256sum {} failed",
        path.display()
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
