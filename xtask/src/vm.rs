//! `cargo xtask integration-test --vm`: the privileged tests inside a QEMU
//! guest running a Debian kernel, so they need no root on the developer's
//! machine and can run against kernels other than the host's.
//!
//! How (what is known to work on this project's machines, 2026-11):
//! - Debian's `linux-image-*-amd64` package, downloaded with `apt-get
//!   download` into `target/vm/cache` and unpacked with `dpkg-deb`. No
//!   modules are needed: serial console, initramfs, BPF, BTF, network
//!   namespaces and loopback are built in.
//! - The bzImage is XZ-compressed and TCG spends most of a 20 s boot
//!   decompressing it; the runner decompresses it once on the host
//!   (`vmlinux`, cached) and QEMU boots that through its PVH entry point.
//! - Test binaries are built with `+crt-static` for the gnu target and put
//!   in a busybox initramfs, `testserver` at the absolute path the tests
//!   were compiled with (`CARGO_BIN_EXE_testserver`), `reloader` wherever
//!   `RELOADER_BIN` says.
//! - QEMU's exit status says nothing about the tests, so the guest's init
//!   prints markers on the serial console; the runner parses them,
//!   enforces its own timeout, and fails unless every test binary ran to
//!   the end. KVM is opt-in (`--kvm`): on these machines `/dev/kvm` opens
//!   but guests hang.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{run, workspace_root};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// Tests that cannot run in the busybox guest, with the reason.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "nginx_reloads_under_load_lose_no_connection",
        "nginx is not in the initramfs",
    ),
    (
        "the_systemd_unit_passes_systemd_analyze_verify",
        "systemd-analyze is not in the initramfs",
    ),
];

/// Test binaries that cannot run in the busybox guest, with the reason.
const HOST_ONLY_SUITES: &[(&str, &str)] = &[(
    "servers",
    "the real servers it wraps (nginx, HAProxy, Caddy, Apache, gunicorn, Go, Python) are not in \
     the initramfs",
)];

pub struct VmOptions {
    /// A kernel image (bzImage or vmlinux), a `linux-image-*.deb`, or None
    /// for Debian's current `linux-image-amd64`.
    pub kernel: Option<PathBuf>,
    pub kvm: bool,
    pub timeout: Duration,
    /// Test binaries to run (all when empty).
    pub only: Vec<String>,
}

pub fn integration_test(options: &VmOptions) -> Result<()> {
    let started = Instant::now();
    crate::ebpf::install_apt(PACKAGES)?;
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    std::fs::create_dir_all(vm_dir.join("cache"))?;
    let kernel = prepare_kernel(options.kernel.as_deref(), &vm_dir)?;
    let mut binaries = build_static(&root)?;
    for (suite, reason) in HOST_ONLY_SUITES {
        ensure!(
            !options.only.iter().any(|n| n == suite),
            "--only {suite}: it runs on the host only ({reason})"
        );
        if binaries.tests.iter().any(|(n, _)| n == suite) {
            println!("vm: not running the {suite} suite: {reason}");
            binaries.tests.retain(|(n, _)| n != suite);
        }
    }
    if !options.only.is_empty() {
        for name in &options.only {
            ensure!(
                binaries.tests.iter().any(|(n, _)| n == name),
                "--only {name}: no such test binary (have: {})",
                binaries
                    .tests
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        binaries.tests.retain(|(n, _)| options.only.contains(n));
        println!("vm: running only {}", options.only.join(", "));
    }
    let initramfs = make_initramfs(&binaries, kernel.modules.as_deref(), &vm_dir)?;
    let kernel = kernel.image;
    println!(
        "vm: kernel {}, {} test binaries, initramfs {} MiB (prepared in {:.0}s)",
        kernel.display(),
        binaries.tests.len(),
        std::fs::metadata(&initramfs)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    let outcome = boot(&kernel, &initramfs, options)?;
    outcome.report(started.elapsed())
}

/// A kernel to boot.
struct Kernel {
    /// A decompressed vmlinux if possible, else the bzImage.
    image: PathBuf,
    /// `lib/modules/VERSION` of its package, if it came from one.
    modules: Option<PathBuf>,
}

/// Modules the tests need that Debian builds as modules: sock_diag for TCP
/// (discovery lists listening sockets with it).
const MODULES: &[&str] = &[
    "kernel/net/ipv4/inet_diag.ko",
    "kernel/net/ipv4/tcp_diag.ko",
];

fn prepare_kernel(kernel: Option<&Path>, vm_dir: &Path) -> Result<Kernel> {
    let deb = match kernel {
        Some(path) if path.extension().is_some_and(|e| e == "deb") => path.to_path_buf(),
        Some(image) => {
            return Ok(Kernel {
                image: image.to_path_buf(),
                modules: None,
            });
        }
        None => download_kernel_deb(&vm_dir.join("cache"))?,
    };
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .context("kernel package name")?
        .to_owned();
    let unpacked = vm_dir.join("kernel").join(&stem);
    if !unpacked.join("boot").is_dir() {
        std::fs::create_dir_all(&unpacked)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let bzimage = std::fs::read_dir(unpacked.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;
    let modules = std::fs::read_dir(unpacked.join("lib/modules"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path());
    let vmlinux = unpacked.join("vmlinux");
    if !vmlinux.exists()
        && let Err(error) = decompress(&bzimage, &vmlinux)
    {
        println!(
            "vm: cannot decompress {} ({error:#}); booting the bzImage (slower)",
            bzimage.display()
        );
        return Ok(Kernel {
            image: bzimage,
            modules,
        });
    }
    Ok(Kernel {
        image: vmlinux,
        modules,
    })
}

/// `apt-get download` of the package `linux-image-amd64` depends on.
fn download_kernel_deb(cache: &Path) -> Result<PathBuf> {
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let package = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("apt-cache depends linux-image-amd64 names no kernel package (apt-get update?)")?
        .to_owned();
    if let Some(deb) = find_deb(cache, &package)? {
        return Ok(deb);
    }
    println!("vm: downloading {package}");
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(cache))?;
    find_deb(cache, &package)?.with_context(|| format!("apt-get download {package} left no .deb"))
}

fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    Ok(std::fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        }))
}

/// Extracts the XZ-compressed vmlinux from a bzImage.
fn decompress(bzimage: &Path, vmlinux: &Path) -> Result<()> {
    const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
    let image = std::fs::read(bzimage)?;
    let start = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .context("no XZ stream in the bzImage")?;
    let tmp = vmlinux.with_extension("tmp");
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&tmp)?)
        .spawn()
        .context("xz")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        // xz stops at the end of the stream and may close its input early.
        let _ = stdin.write_all(&image[start..]);
    }
    ensure!(child.wait()?.success(), "xz failed");
    ensure!(
        std::fs::read(&tmp)?.starts_with(b"\x7fELF"),
        "not an ELF vmlinux"
    );
    std::fs::rename(&tmp, vmlinux)?;
    Ok(())
}

struct Binaries {
    /// (test target name, executable).
    tests: Vec<(String, PathBuf)>,
    reloader: PathBuf,
    testserver: PathBuf,
}

/// Static builds of the integration tests and the binaries they run.
fn build_static(root: &Path) -> Result<Binaries> {
    let rustflags = "-C target-feature=+crt-static -C strip=debuginfo";
    let cargo = env!("CARGO");
    run(Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", rustflags)
        .args([
            "build",
            "--target",
            TARGET,
            "-p",
            "reloader",
            "-p",
            "reloader-tests",
            "--bins",
        ]))?;
    let output = Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", rustflags)
        .args([
            "test",
            "--no-run",
            "--message-format=json",
            "--target",
            TARGET,
            "-p",
            "reloader-tests",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    ensure!(output.status.success(), "building the test binaries failed");
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if message["reason"] == "compiler-artifact"
            && is_test
            && let Some(exe) = message["executable"].as_str()
        {
            let name = message["target"]["name"]
                .as_str()
                .unwrap_or("test")
                .to_owned();
            tests.push((name, PathBuf::from(exe)));
        }
    }
    ensure!(!tests.is_empty(), "no integration test binaries were built");
    tests.sort();
    let bin = root.join("target").join(TARGET).join("debug");
    Ok(Binaries {
        tests,
        reloader: bin.join("reloader"),
        testserver: bin.join("testserver"),
    })
}

/// The guest's /init: mounts what the tests need, runs every test binary
/// with markers around it, powers off. No tmpfs over /tmp: the initramfs
/// root is already writable memory, and `testserver` sits at the host path
/// the tests were compiled with, which is under /tmp for a clone there.
fn init_script(tests: &[(String, PathBuf)]) -> String {
    let skips: String = EXCLUDED
        .iter()
        .map(|(name, _)| format!(" --skip {name}"))
        .collect();
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1 RELOADER_BIN=/bin/reloader\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         [ -d /lib/modules ] && depmod && modprobe tcp_diag\n\
         ip link set lo up\n\
         echo \"@@KERNEL $(uname -r)\"\n",
    );
    for (name, _) in tests {
        script.push_str(&format!(
            "echo '@@BEGIN {name}'\n/tests/{name} --test-threads=1{skips}\necho \"@@END {name} $?\"\n"
        ));
    }
    script.push_str("echo '@@ALLDONE'\npoweroff -f\n");
    script
}

fn make_initramfs(binaries: &Binaries, modules: Option<&Path>, vm_dir: &Path) -> Result<PathBuf> {
    let staging = vm_dir.join("initramfs");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    for dir in ["bin", "tests", "proc", "sys", "dev", "tmp", "run", "etc"] {
        std::fs::create_dir_all(staging.join(dir))?;
    }
    let copy = |from: &Path, to: &Path| -> Result<()> {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    };
    copy(Path::new("/bin/busybox"), &staging.join("bin/busybox"))?;
    copy(&binaries.reloader, &staging.join("bin/reloader"))?;
    // Where the tests were compiled to find it.
    let testserver = staging.join(binaries.testserver.strip_prefix("/")?);
    copy(&binaries.testserver, &testserver)?;
    for (name, exe) in &binaries.tests {
        copy(exe, &staging.join("tests").join(name))?;
    }
    if let Some(modules) = modules {
        let version = modules.file_name().context("modules dir")?;
        let into = staging.join("lib/modules").join(version);
        for module in MODULES {
            let from = modules.join(module);
            if from.exists() {
                copy(&from, &into.join(module))?;
            }
        }
    }
    let init = staging.join("init");
    std::fs::write(&init, init_script(&binaries.tests))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let archive = vm_dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet > \"$0\"")
        .arg(&archive)
        .current_dir(&staging)
        .status()?;
    ensure!(status.success(), "cpio failed");
    Ok(archive)
}

/// What the guest reported.
#[derive(Default)]
struct Outcome {
    kernel: Option<String>,
    /// (binary, exit code)
    binaries: Vec<(String, i32)>,
    passed: Vec<String>,
    failed: Vec<String>,
    finished: bool,
    timed_out: bool,
    boot: Option<Duration>,
}

fn boot(kernel: &Path, initramfs: &Path, options: &VmOptions) -> Result<Outcome> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-m",
        "2G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    if options.kvm {
        qemu.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        qemu.args(["-accel", "tcg", "-cpu", "max"]);
    }
    let started = Instant::now();
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut outcome = Outcome::default();
    let deadline = started + options.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                println!("vm| {line}");
                outcome.parse(&line, started);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    Ok(outcome)
}

impl Outcome {
    fn parse(&mut self, line: &str, started: Instant) {
        // Firmware output can precede a marker on the same console line.
        let line = line.find("@@").map_or(line, |i| &line[i..]);
        if let Some(kernel) = line.strip_prefix("@@KERNEL ") {
            self.kernel = Some(kernel.to_owned());
            self.boot = Some(started.elapsed());
        } else if let Some(rest) = line.strip_prefix("@@END ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                self.binaries
                    .push((name.to_owned(), code.parse().unwrap_or(-1)));
            }
        } else if line == "@@ALLDONE" {
            self.finished = true;
        } else if let Some(test) = line.strip_prefix("test ") {
            if let Some(name) = test.strip_suffix(" ... ok") {
                self.passed.push(name.to_owned());
            } else if let Some(name) = test.strip_suffix(" ... FAILED") {
                self.failed.push(name.to_owned());
            }
        }
    }

    fn report(&self, total: Duration) -> Result<()> {
        println!();
        println!(
            "vm: kernel {}, booted in {}, whole run {:.0}s",
            self.kernel.as_deref().unwrap_or("?"),
            self.boot
                .map_or("-".into(), |b| format!("{:.1}s", b.as_secs_f64())),
            total.as_secs_f64()
        );
        for (name, code) in &self.binaries {
            println!("vm: test binary {name}: exit {code}");
        }
        println!("vm: excluded in the VM (and why):");
        for (name, why) in EXCLUDED {
            println!("vm:   {name}: {why}");
        }
        for name in &self.failed {
            println!("vm: FAILED {name}");
        }
        println!(
            "vm: {} passed, {} failed",
            self.passed.len(),
            self.failed.len()
        );
        if self.timed_out {
            bail!("the VM did not finish within the timeout");
        }
        ensure!(
            self.finished,
            "the VM stopped before running every test binary"
        );
        ensure!(
            self.failed.is_empty() && self.binaries.iter().all(|(_, c)| *c == 0),
            "tests failed in the VM"
        );
        ensure!(!self.passed.is_empty(), "no test ran in the VM");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_console_is_parsed_into_results() {
        let mut o = Outcome::default();
        let t = Instant::now();
        for line in [
            "Booting from ROM..@@KERNEL 6.1.0-56-amd64",
            "@@BEGIN steering",
            "test a ... ok",
            "test b ... FAILED",
            "@@END steering 101",
            "@@ALLDONE",
        ] {
            o.parse(line, t);
        }
        assert_eq!(o.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!((o.passed.len(), o.failed.len()), (1, 1));
        assert_eq!(o.binaries, vec![("steering".to_owned(), 101)]);
        assert!(o.finished);
        assert!(o.report(Duration::ZERO).is_err(), "a failure fails the run");
    }

    #[test]
    fn a_vm_that_stops_early_fails_the_run() {
        let mut o = Outcome::default();
        o.parse("test a ... ok", Instant::now());
        assert!(o.report(Duration::ZERO).is_err());
    }
}
