//! `cargo xtask systemd-test`: the Debian package under a real systemd.
//! A QEMU guest (TCG) boots Debian's kernel with a Debian bookworm root
//! whose PID 1 is systemd; the package is installed there with `dpkg -i`
//! and `reloader@nginx` is started, reloaded, killed, upgraded and stopped
//! under load (`systemd-tests.sh` says what each test proves).
//!
//! How:
//! - The root: `mmdebstrap` (Debian's, from the host's mirror) of
//!   bookworm's essential packages plus systemd, nginx-light and a few
//!   tools, nginx's own service disabled; packed as a cpio archive and
//!   cached under `target/vm/systemd/` by a digest of what made it. A
//!   second, small archive is appended for each run (the kernel unpacks
//!   both into one root): the two packages (`cargo xtask dist` at the
//!   crate's version and at a higher one, from one build), the load
//!   client, the tests and the unit that runs them, the sock_diag modules
//!   of the kernel.
//! - The whole root lives in the initramfs (no disk image, no root
//!   device): the kernel runs `rdinit=/lib/systemd/systemd`. Debian's
//!   bookworm kernel (`linux-image-amd64` of the host's apt, as the other
//!   VM tests), decompressed for PVH boot.
//! - The tests run as a oneshot unit once multi-user.target is reached,
//!   write their results to the serial console (the runner's markers, as
//!   in `integration-test --vm`), and power the guest off. No network:
//!   the load is the guest's own loopback.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use super::{KernelChoice, MODULES, Phases, VmOptions, boot, copy_module, prepare_kernel};
use crate::{dist, run, workspace_root};

/// Host packages the runner needs.
const PACKAGES: &[&str] = &["qemu-system-x86", "mmdebstrap", "cpio"];

/// The guest's Debian release (its systemd: 252).
const SUITE: &str = "bookworm";

/// What the guest's root holds beyond bookworm's essential packages.
const ROOT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "nginx-light",
    "curl",
    "jq",
    "kmod",
    "iproute2",
    "procps",
    "attr",
];

/// The guest's kernel command line: systemd as PID 1 from the initramfs,
/// quiet consoles (the tests' output is what the runner reads).
const APPEND: &str = "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/lib/systemd/systemd \
                      systemd.show_status=false systemd.unit=multi-user.target";

/// The tests (bash, run in the guest).
const TESTS: &str = include_str!("systemd-tests.sh");

/// The unit that runs them, and powers off whatever happened.
const TEST_UNIT: &str = "[Unit]
Description=reloader's systemd VM tests
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/bash /vm/tests.sh
ExecStopPost=/usr/bin/systemctl poweroff --force --force
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=40min

[Install]
WantedBy=multi-user.target
";

#[derive(clap::Args)]
pub struct SystemdArgs {
    /// Use KVM instead of TCG (hangs on some hosts).
    #[arg(long)]
    pub kvm: bool,
    /// Give up on the VM after this many minutes.
    #[arg(long, default_value_t = 20)]
    pub timeout_minutes: u64,
    /// Seconds of load (at most) around the controller's kill and the
    /// upgrade.
    #[arg(long, default_value_t = 8)]
    pub load_seconds: u32,
}

pub fn systemd_test(args: &SystemdArgs) -> Result<()> {
    let started = Instant::now();
    crate::ebpf::install_apt(PACKAGES)?;
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    let dir = vm_dir.join("systemd");
    std::fs::create_dir_all(vm_dir.join("cache"))?;
    std::fs::create_dir_all(&dir)?;
    let mut phases = Phases {
        packages: started.elapsed(),
        ..Phases::default()
    };
    let step = Instant::now();
    let kernel = prepare_kernel(&KernelChoice::Host, &vm_dir)?;
    let modules = kernel
        .modules
        .clone()
        .context("the kernel package brought no modules")?;
    phases.kernel = step.elapsed();

    let step = Instant::now();
    let v1 = dist::build(&dist::DistArgs {
        deb_version: None,
        output: Some(dir.join("debs/v1")),
    })?;
    let newer = newer_version(&v1)?;
    let v2 = dist::build(&dist::DistArgs {
        deb_version: Some(newer.clone()),
        output: Some(dir.join("debs/v2")),
    })?;
    let loadgen = build_loadgen(&root)?;
    phases.build = step.elapsed();

    let step = Instant::now();
    let base = base_root(&dir)?;
    let overlay = overlay(
        &dir,
        &Staged {
            v1: &v1,
            v2: &v2,
            newer: &newer,
            loadgen: &loadgen,
            modules: &modules,
            load_seconds: args.load_seconds,
        },
    )?;
    let initramfs = dir.join("initramfs.cpio");
    concatenate(&[&base, &overlay], &initramfs)?;
    phases.initramfs = step.elapsed();
    println!(
        "systemd-vm: kernel {}, root {} MiB + overlay {} MiB (prepared in {:.0}s)",
        kernel.image.display(),
        std::fs::metadata(&base)?.len() >> 20,
        std::fs::metadata(&overlay)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );

    let options = VmOptions {
        kernel: KernelChoice::Host,
        kvm: args.kvm,
        timeout: Duration::from_secs(args.timeout_minutes * 60),
        only: Vec::new(),
        test_args: Vec::new(),
        repeat: 1,
    };
    let vm_started = Instant::now();
    let outcome = boot(&kernel.image, &initramfs, &options, APPEND)?;
    phases.vm = vm_started.elapsed();
    let result = outcome.report(&phases, started.elapsed(), &[]);
    println!(
        "systemd-vm: whole run {:.0}s (VM {:.0}s)",
        started.elapsed().as_secs_f64(),
        phases.vm.as_secs_f64()
    );
    result
}

/// A Debian version above `deb`'s (its revision plus one): the package
/// the upgrade test installs over the first.
fn newer_version(deb: &Path) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .arg("Version")
        .output()
        .context("dpkg-deb --field")?;
    ensure!(
        out.status.success(),
        "dpkg-deb --field {} failed",
        deb.display()
    );
    let version = String::from_utf8(out.stdout)?.trim().to_owned();
    let (upstream, revision) = version
        .rsplit_once('-')
        .with_context(|| format!("version {version} has no Debian revision"))?;
    let revision: u64 = revision
        .parse()
        .with_context(|| format!("revision of {version}"))?;
    Ok(format!("{upstream}-{}", revision + 1))
}

/// The load client, static (the guest's libc may differ from the host's).
fn build_loadgen(root: &Path) -> Result<PathBuf> {
    run(Command::new(env!("CARGO"))
        .current_dir(root)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .args([
            "build",
            "--locked",
            "--target",
            super::TARGET,
            "-p",
            "reloader-tests",
            "--bin",
            "loadgen",
        ]))?;
    Ok(dist::target_dir().join(super::TARGET).join("debug/loadgen"))
}

/// The guest's root, cached as a cpio archive named by a digest of what
/// makes it.
fn base_root(dir: &Path) -> Result<PathBuf> {
    let mirror = super::host_mirror();
    let recipe = format!(
        "{SUITE} {mirror} {} {}",
        ROOT_PACKAGES.join(","),
        mmdebstrap_args(Path::new("ROOT"), &mirror).join(" ")
    );
    let digest = fnv(recipe.as_bytes());
    let archive = dir.join(format!("root-{SUITE}-{digest:016x}.cpio"));
    if archive.exists() {
        println!("systemd-vm: root {} (cached)", archive.display());
        return Ok(archive);
    }
    let tree = dir.join("root");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    println!("systemd-vm: building the {SUITE} root with mmdebstrap from {mirror}");
    run(Command::new("mmdebstrap").args(mmdebstrap_args(&tree, &mirror)))?;
    cpio(&tree, &archive)?;
    std::fs::remove_dir_all(&tree)?;
    Ok(archive)
}

fn mmdebstrap_args(tree: &Path, mirror: &str) -> Vec<String> {
    vec![
        "--mode=root".into(),
        "--variant=essential".into(),
        "--quiet".into(),
        // The host's apt accepts the mirror's Release files as they are.
        "--aptopt=Acquire::Check-Valid-Until \"false\"".into(),
        format!("--include={}", ROOT_PACKAGES.join(",")),
        // nginx runs under reloader only; no login prompt on the serial
        // console the tests write to.
        "--customize-hook=systemctl --root=\"$1\" disable nginx.service".into(),
        "--customize-hook=systemctl --root=\"$1\" mask serial-getty@ttyS0.service \
         getty@tty1.service"
            .into(),
        "--customize-hook=echo reloader-vm > \"$1/etc/hostname\"".into(),
        SUITE.into(),
        tree.display().to_string(),
        mirror.into(),
    ]
}

/// What one run adds to the root.
struct Staged<'a> {
    v1: &'a Path,
    v2: &'a Path,
    newer: &'a str,
    loadgen: &'a Path,
    modules: &'a Path,
    load_seconds: u32,
}

fn overlay(dir: &Path, staged: &Staged<'_>) -> Result<PathBuf> {
    let tree = dir.join("overlay");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    let copy = |from: &Path, to: &Path| -> Result<()> {
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        std::fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    };
    let file_name = |p: &Path| p.file_name().map(PathBuf::from).context("a file name");
    copy(staged.v1, &tree.join("vm/v1").join(file_name(staged.v1)?))?;
    copy(staged.v2, &tree.join("vm/v2").join(file_name(staged.v2)?))?;
    std::fs::write(tree.join("vm/v2/version"), staged.newer)?;
    std::fs::write(
        tree.join("vm/settings"),
        format!("LOAD_SECONDS={}\n", staged.load_seconds),
    )?;
    std::fs::write(tree.join("vm/tests.sh"), TESTS)?;
    copy(staged.loadgen, &tree.join("usr/local/bin/loadgen"))?;
    let units = tree.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("multi-user.target.wants"))?;
    std::fs::write(units.join("reloader-vm-tests.service"), TEST_UNIT)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/reloader-vm-tests.service",
        units.join("multi-user.target.wants/reloader-vm-tests.service"),
    )?;
    // The sock_diag modules discovery needs (Debian builds them as
    // modules); the guest runs depmod and loads them before the tests.
    // Under usr/: the root's /lib is a symlink to usr/lib, and a directory
    // of the same name in this archive would replace it as it is unpacked.
    let version = staged.modules.file_name().context("modules dir")?;
    let into = tree.join("usr/lib/modules").join(version);
    for module in MODULES {
        copy_module(
            &staged.modules.join(module),
            &into.join(format!("{module}.ko")),
        )?;
    }
    for name in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let from = staged.modules.join(name);
        if from.exists() {
            copy(&from, &into.join(name))?;
        }
    }
    let archive = dir.join("overlay.cpio");
    cpio(&tree, &archive)?;
    Ok(archive)
}

/// Packs `tree` as a newc cpio archive (what the kernel unpacks).
fn cpio(tree: &Path, archive: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet > \"$0\"")
        .arg(archive)
        .current_dir(tree)
        .status()?;
    ensure!(status.success(), "cpio of {} failed", tree.display());
    Ok(())
}

/// One initramfs of several archives: the kernel unpacks each in turn
/// into the same root.
fn concatenate(parts: &[&Path], into: &Path) -> Result<()> {
    let mut out = std::fs::File::create(into)?;
    for part in parts {
        std::io::copy(&mut std::fs::File::open(part)?, &mut out)?;
    }
    Ok(())
}

/// FNV-1a, for the cache's name (stable across builds).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_runs_systemd_and_every_test() {
        assert!(APPEND.contains("rdinit=/lib/systemd/systemd"));
        for test in [
            "the_package_installs_with_dpkg",
            "systemctl_start_serves",
            "delegate_gives_reloader_its_cgroup",
            "systemctl_reload_is_reload_wait",
            "a_killed_controller_is_restarted_and_adopts_under_load",
            "an_upgrade_hands_over_without_touching_nginx",
            "systemctl_stop_drains",
        ] {
            assert!(
                TESTS.contains(&format!("\n{test}() {{"))
                    && TESTS.contains(&format!("run_test {test}\n")),
                "{test} is defined and run"
            );
        }
        assert!(TESTS.contains("echo \"@@END systemd $FAILED\""));
    }
}
