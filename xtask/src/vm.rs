//! `cargo xtask integration-test --vm`: the privileged tests inside a QEMU
//! guest running a Debian kernel, so they need no root on the developer's
//! machine and can run against kernels other than the host's.
//!
//! How (what is known to work on this project's machines, 2026-11):
//! - `--kernel bullseye|bookworm|trixie`: that release's
//!   `linux-image-amd64` dependency, found and downloaded with an apt
//!   configuration of the runner's own under `target/vm/apt/RELEASE/` (its
//!   own sources.list naming the host's Debian mirror, lists, cache, an
//!   empty sources.list.d, no dpkg status); the host's sources and lists
//!   are never touched. Release files are checked against the host's
//!   `/usr/share/keyrings/debian-archive-keyring.gpg` (bookworm's package
//!   holds the bullseye and trixie keys too). No `--kernel`: the host apt's
//!   own `linux-image-amd64`. The `.deb` is cached in `target/vm/cache` and
//!   unpacked with `dpkg-deb`.
//! - Serial console, initramfs, BPF, BTF (`CONFIG_DEBUG_INFO_BTF=y`),
//!   network namespaces and loopback are built into all three kernels.
//!   `inet_diag`, `tcp_diag` and `udp_diag` are modules on all three (no
//!   dependencies beyond `inet_diag`): the runner copies them into the
//!   initramfs, decompressed on the host (trixie ships `.ko.xz` under
//!   `/usr/lib/modules`, the older ones plain `.ko` under `/lib/modules`).
//! - Under TCG the kernel's own decompressor is slow, so the runner finds
//!   the bzImage's payload through the boot protocol header, decompresses
//!   it once on the host (`vmlinux`, cached; the size trailer is checked)
//!   and QEMU boots that through its PVH entry point (`CONFIG_PVH=y` on all
//!   three). It boots the bzImage if that fails (5.10's bzImage booted as
//!   is reached init in 4.4 s instead of 2.4 s; `--kernel PATH` to a bare
//!   image also brings no modules, and on Debian's kernels `reloader run`
//!   then refuses to start for want of `tcp_diag`).
//! - Test binaries are built with `+crt-static` for the gnu target and put
//!   in a busybox initramfs, `testserver` at the absolute path the tests
//!   were compiled with (`CARGO_BIN_EXE_testserver`), `reloader` wherever
//!   `RELOADER_BIN` says.
//! - The host's nginx (`/usr/sbin/nginx`, `nginx-light` installed when
//!   missing) goes in with the libraries `ldd` names and an
//!   `/etc/passwd`/`/etc/group` for its workers' `nobody`/`nogroup`
//!   ([`nginx`]), so the nginx tests of the config, launcher and rollout
//!   suites run in the guest; the init prints its version (`nginx|`).
//! - Before the tests, the guest runs `reloader run` on a scratch port and
//!   reads which steering program loaded from its status (`@@STEERING`;
//!   its `steering program loaded` log line is echoed too). Under
//!   select-only steering it skips the tests of [`NEEDS_SELECT_OR_MIGRATE`]
//!   and names them (`@@NOTAPPLICABLE`); the runner lists them with their
//!   reason, counted apart from passed and failed.
//! - QEMU's exit status says nothing about the tests, so the guest's init
//!   prints markers on the serial console; the runner parses them,
//!   enforces its own timeout, and fails unless every test binary ran to
//!   the end. KVM is opt-in (`--kvm`): on these machines `/dev/kvm` opens
//!   but guests hang.
//!
//! The kernels, measured under TCG (`-cpu max`, 2 vCPUs, 2 GiB) on a
//! 2-core host shared with other work, 2026-11-23; "boot" is QEMU start to
//! the init's first marker:
//!
//! | `--kernel` | version booted | bzImage payload | modules | boot | steering |
//! |---|---|---|---|---|---|
//! | bullseye | 5.10.0-32-amd64 (5.10.223-1) | xz | `/lib/modules`, `.ko` | 2.4–5.6 s | select-only: the verifier rejects `steer_migrate` (EACCES) |
//! | bookworm | 6.1.0-50-amd64 (6.1.176-1; the host's apt gives 6.1.0-56, 6.1.192-2, from bookworm-security) | xz | `/lib/modules`, `.ko` | 2.8–3.7 s | select-or-migrate |
//! | trixie | 6.12.117+deb13-amd64 (6.12.117-1) | zstd | `/usr/lib/modules`, `.ko.xz` | 2.8 s | select-or-migrate |
//!
//! On 5.10 every suite passed except the steering suite's five
//! select-or-migrate tests (not applicable there, as is the rollout
//! suite's crash during the hold); `reloader demo`'s test failed once there
//! (1 "short read" of 1,940 connections) and passed on the next run. The nginx tests pass on 5.10 too: no connection
//! failed in 20 reloads under load, QUIT at `--settle` 0s to 3s, TERM at
//! 250ms and 3s (`measure_nginx_*` in the launcher suite; docs/limits.md,
//! "Select-only steering on 5.10", has the figures). Wall
//! time with the kernel cached and the binaries built: `--only
//! steering,reliability` 79 s (trixie) to 93 s (bullseye); every suite on
//! bookworm about 7½ minutes (the launcher suite 5 of them). A first run
//! adds the download (56–108 MB, a few seconds here) and decompression.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{run, workspace_root};

mod nginx;
pub mod systemd;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// Tests that cannot run in the busybox guest, with the reason.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "the_systemd_unit_passes_systemd_analyze_verify",
        "systemd-analyze is not in the initramfs",
    ),
    (
        "node_http_listen_without_reuseport_reloads_lose_nothing",
        INJECT_HOST_ONLY,
    ),
    (
        "go_listen_and_serve_without_listenconfig_reloads_lose_nothing",
        INJECT_HOST_ONLY,
    ),
    (
        "uvicorn_default_listener_reloads_lose_nothing",
        INJECT_HOST_ONLY,
    ),
    (
        "python_threading_http_server_reloads_lose_nothing",
        INJECT_HOST_ONLY,
    ),
    (
        "python_dns_like_udp_server_stateless_loses_nothing",
        INJECT_HOST_ONLY,
    ),
    ("unmanaged_sockets_keep_their_options", INJECT_HOST_ONLY),
    (
        "drain_command_drains_a_server_whose_graceful_stop_is_an_http_call",
        INJECT_HOST_ONLY,
    ),
    (
        "injection_without_a_cgroup_v2_is_refused",
        "util-linux's unshare (a mount namespace without cgroupfs) is not in the initramfs",
    ),
];

const INJECT_HOST_ONLY: &str = "Node.js, Go and Python (with uvicorn) are not in the initramfs";

/// Test binaries that cannot run in the busybox guest, with the reason.
const HOST_ONLY_SUITES: &[(&str, &str)] = &[
    (
        "servers",
        "the real servers it wraps besides nginx (HAProxy, Caddy, Apache, gunicorn, Go, Python) \
         are not in the initramfs",
    ),
    (
        "udp",
        "the servers and clients it runs (unbound, Knot, dnsperf, Caddy, Python with aioquic) are \
         not in the initramfs",
    ),
    (
        "fleet",
        "Prometheus, promtool, openssl and htpasswd are not in the initramfs",
    ),
];

const INJECT: &str = "--inject-reuseport is expected to be refused on a select-only kernel \
                      (5.10: by our reading its verifier rejects bpf_setsockopt in cgroup \
                      bind programs); injection_is_refused_by_name_where_the_kernel_cannot \
                      runs instead";

/// Tests that need the select-or-migrate program (Linux >= 5.14), with the
/// reason: (test binary, test, reason). When the guest reports select-only
/// steering, the guest's init skips them and prints them as not applicable;
/// the runner lists them apart from passed and failed. Each of them asserts
/// the mode itself, so run on a select-only kernel anyway it fails instead
/// of passing vacuously.
const NEEDS_SELECT_OR_MIGRATE: &[(&str, &str, &str)] = &[
    (
        "launcher",
        "crashes_under_load_lose_no_connection_the_bridge_holds_them_until_the_restart",
        BRIDGE,
    ),
    (
        "launcher",
        "a_generation_that_stops_listening_is_replaced",
        BRIDGE,
    ),
    (
        "rollout",
        "a_crash_during_the_hold_reinstates_the_previous_generation",
        "the crashed generation's queued connections reach the held one by migration (Linux >= \
         5.14); select-only kernels reset them",
    ),
    (
        "steering",
        "loads_select_or_migrate_on_this_kernel",
        "asserts the select-or-migrate program loads (Linux >= 5.14)",
    ),
    (
        "steering",
        "accept_queue_migrates_when_the_old_listener_closes",
        MIGRATION,
    ),
    (
        "steering",
        "half_open_requests_migrate_on_their_next_packet",
        MIGRATION,
    ),
    (
        "steering",
        "half_open_requests_migrate_through_a_wildcard_listener",
        MIGRATION,
    ),
    (
        "inject",
        "testserver_without_reuseport_reloads_under_load_with_injection",
        INJECT,
    ),
    (
        "inject",
        "testserver_udp_without_reuseport_loses_no_datagram_with_injection",
        INJECT,
    ),
    (
        "inject",
        "the_bind_programs_outlive_a_killed_controller",
        INJECT,
    ),
    (
        "steering",
        "one_port_in_both_families_is_two_listeners",
        "select-only steering tells listeners apart by port only (the listener's address, \
         sk_reuseport_md.sk, reaches the program from Linux 5.14)",
    ),
    (
        "steering",
        "one_port_on_two_addresses_is_two_listeners",
        "select-only steering tells listeners apart by port only (the listener's address, \
         sk_reuseport_md.sk, reaches the program from Linux 5.14)",
    ),
];

const MIGRATION: &str = "migrates a closing listener's queued connections: select-or-migrate \
                         only (Linux >= 5.14); select-only steering resets them";
const BRIDGE: &str = "the bridge listener is made only with select-or-migrate steering (Linux \
                      >= 5.14): without migration, closing it would reset what it holds";

/// Debian releases `--kernel` accepts by name, with the kernel series their
/// `linux-image-amd64` depends on.
pub const SUITES: &[(&str, &str)] = &[
    ("bullseye", "5.10"),
    ("bookworm", "6.1"),
    ("trixie", "6.12"),
];

/// Which kernel to boot.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelChoice {
    /// The `linux-image-amd64` of the host's own apt sources.
    Host,
    /// That Debian release's `linux-image-amd64` (downloaded with an apt
    /// configuration of the runner's own).
    Suite(&'static str),
    /// A bzImage, a vmlinux or a `linux-image-*.deb`.
    File(PathBuf),
}

impl KernelChoice {
    /// `bullseye`, `bookworm`, `trixie` or a path (a file of that name wins).
    pub fn parse(value: &str) -> Result<Self> {
        let path = Path::new(value);
        if path.exists() {
            return Ok(Self::File(path.to_path_buf()));
        }
        if let Some((suite, _)) = SUITES.iter().find(|(s, _)| *s == value) {
            return Ok(Self::Suite(suite));
        }
        bail!(
            "--kernel {value}: no such file, and not a Debian release this runner knows; give a \
             bzImage, a vmlinux, a linux-image-*.deb, or one of {}",
            SUITES
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

pub struct VmOptions {
    pub kernel: KernelChoice,
    pub kvm: bool,
    pub timeout: Duration,
    /// Test binaries to run (all when empty).
    pub only: Vec<String>,
    /// Extra arguments for every test binary (e.g. `--ignored NAME`).
    pub test_args: Vec<String>,
    /// How many times each test binary runs in the one boot (loops of a
    /// rare failure: `--repeat 50 --test-args "NAME --exact"`).
    pub repeat: u32,
}

pub fn integration_test(options: &VmOptions) -> Result<()> {
    let started = Instant::now();
    crate::ebpf::install_apt(PACKAGES)?;
    // The guest runs the host's nginx (see `nginx`).
    crate::deps::install_nginx()?;
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    std::fs::create_dir_all(vm_dir.join("cache"))?;
    let mut phases = Phases {
        packages: started.elapsed(),
        ..Phases::default()
    };
    let step = Instant::now();
    let kernel = prepare_kernel(&options.kernel, &vm_dir)?;
    phases.kernel = step.elapsed();
    let step = Instant::now();
    let mut binaries = build_static(&root)?;
    phases.build = step.elapsed();
    let step = Instant::now();
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
    let initramfs = make_initramfs(&binaries, kernel.modules.as_deref(), &vm_dir, options)?;
    let image = kernel.image;
    println!(
        "vm: kernel {}, {} test binaries, initramfs {} MiB (prepared in {:.0}s)",
        image.display(),
        binaries.tests.len(),
        std::fs::metadata(&initramfs)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    phases.initramfs = step.elapsed();
    let vm_started = Instant::now();
    let outcome = boot(&image, &initramfs, options, BUSYBOX_APPEND)?;
    phases.vm = vm_started.elapsed();
    outcome.report(&phases, started.elapsed(), EXCLUDED)
}

/// The busybox guest's kernel command line (its `/init` is the runner's).
const BUSYBOX_APPEND: &str = "console=ttyS0 panic=-1 quiet";

/// Wall time of each step of a run.
#[derive(Default)]
struct Phases {
    /// Installing QEMU, busybox and cpio (apt; instant once installed).
    packages: Duration,
    /// Download, unpack, decompress (cached after the first run).
    kernel: Duration,
    /// Static test binaries.
    build: Duration,
    initramfs: Duration,
    /// QEMU start to power-off (boot + tests).
    vm: Duration,
}

/// A kernel to boot.
struct Kernel {
    /// A decompressed vmlinux if possible, else the bzImage.
    image: PathBuf,
    /// `lib/modules/VERSION` of its package, if it came from one.
    modules: Option<PathBuf>,
}

/// Modules the tests need that Debian builds as modules: sock_diag for TCP
/// (discovery lists listening sockets with it) and for UDP (UDP listeners
/// come later); names without the `.ko[.xz|.zst|.gz]` suffix.
const MODULES: &[&str] = &[
    "kernel/net/ipv4/inet_diag",
    "kernel/net/ipv4/tcp_diag",
    "kernel/net/ipv4/udp_diag",
];

fn prepare_kernel(kernel: &KernelChoice, vm_dir: &Path) -> Result<Kernel> {
    let cache = vm_dir.join("cache");
    let deb = match kernel {
        KernelChoice::File(path) if path.extension().is_some_and(|e| e == "deb") => path.clone(),
        KernelChoice::File(image) => {
            println!(
                "vm: {} brings no modules: `reloader` needs sock_diag for TCP built in \
                 (CONFIG_INET_TCP_DIAG=y); for a Debian kernel pass its linux-image-*.deb",
                image.display()
            );
            return Ok(Kernel {
                image: image.clone(),
                modules: None,
            });
        }
        KernelChoice::Host => download_kernel_deb(&cache, &AptConfig::Host)?,
        KernelChoice::Suite(suite) => {
            let apt = AptConfig::private(suite, &vm_dir.join("apt").join(suite))?;
            download_kernel_deb(&cache, &apt)?
        }
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
    // bookworm and older: /lib/modules; trixie (merged /usr): /usr/lib/modules.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(unpacked.join(dir)).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .find(|p| p.is_dir());
    let vmlinux = unpacked.join("vmlinux");
    if !vmlinux.exists() {
        match decompress(&bzimage, &vmlinux) {
            Ok(format) => println!(
                "vm: decompressed {} ({format}) to {}",
                bzimage.display(),
                vmlinux.display()
            ),
            Err(error) => {
                println!(
                    "vm: cannot decompress {} ({error:#}); booting the bzImage (slower)",
                    bzimage.display()
                );
                return Ok(Kernel {
                    image: bzimage,
                    modules,
                });
            }
        }
    }
    Ok(Kernel {
        image: vmlinux,
        modules,
    })
}

/// Which apt configuration finds and downloads the kernel package.
enum AptConfig {
    /// The host's own sources and lists.
    Host,
    /// A configuration of the runner's own for one Debian release: its own
    /// sources.list, lists and cache under `target/vm/apt/SUITE`; the host's
    /// sources, lists and dpkg status are neither read nor written.
    Private {
        suite: &'static str,
        options: Vec<String>,
    },
}

/// Debian's archive keyring (package `debian-archive-keyring`): it holds the
/// keys of bullseye, bookworm and trixie.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl AptConfig {
    fn private(suite: &'static str, dir: &Path) -> Result<Self> {
        ensure!(
            Path::new(KEYRING).exists(),
            "{KEYRING} is missing: install Debian's archive keyring (apt-get install \
             debian-archive-keyring) to check the {suite} archive's signatures"
        );
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = host_mirror();
        let sources = dir.join("sources.list");
        std::fs::write(
            &sources,
            format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"),
        )?;
        let path = |p: &str| dir.join(p).display().to_string();
        let options = [
            ("Dir::Etc::sourcelist", sources.display().to_string()),
            // An empty directory: none of the host's sources.
            ("Dir::Etc::sourceparts", path("sources.list.d")),
            ("Dir::State::Lists", path("lists")),
            ("Dir::Cache", path("cache")),
            // Not the host's installed packages: nothing here is installed.
            ("Dir::State::status", "/dev/null".to_owned()),
            ("APT::Get::List-Cleanup", "false".to_owned()),
            ("Acquire::Languages", "none".to_owned()),
            // Only Packages is needed (no AppStream metadata).
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled",
                "false".to_owned(),
            ),
        ]
        .into_iter()
        .flat_map(|(key, value)| ["-o".to_owned(), format!("{key}={value}")])
        .collect();
        Ok(Self::Private { suite, options })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        if let Self::Private { options, .. } = self {
            command.args(options);
        }
        command
    }

    /// Refreshes a private configuration's package lists. If that fails
    /// (offline) and lists from an earlier run exist, those are used.
    fn update(&self) -> Result<()> {
        let Self::Private { suite, options } = self else {
            return Ok(());
        };
        println!("vm: apt-get update for {suite} (own configuration, host sources untouched)");
        let status = self
            .command("apt-get")
            .args(["-q", "update"])
            .status()
            .context("apt-get")?;
        if status.success() {
            return Ok(());
        }
        let lists = options
            .iter()
            .find_map(|o| o.strip_prefix("Dir::State::Lists="))
            .map(PathBuf::from)
            .context("lists dir")?;
        let have_lists = std::fs::read_dir(&lists)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"));
        ensure!(
            have_lists,
            "apt-get update for {suite} failed and there are no earlier lists in {}: check the \
             network and that {KEYRING} holds {suite}'s key (apt-get install \
             debian-archive-keyring from a newer release)",
            lists.display()
        );
        println!("vm: apt-get update for {suite} failed; using the lists of an earlier run");
        Ok(())
    }
}

/// The Debian mirror the host's apt uses (the first `…/debian` URI in its
/// sources), so the runner downloads from the same place.
fn host_mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        files.sort();
        texts.extend(files.iter().filter_map(|p| std::fs::read_to_string(p).ok()));
    }
    texts
        .iter()
        .find_map(|text| debian_mirror(text))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The first URI ending in `/debian` in a one-line or deb822 sources file.
fn debian_mirror(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| {
            l.strip_prefix("URIs:")
                .map(|uris| uris.split_whitespace().collect::<Vec<_>>())
                .or_else(|| {
                    l.starts_with("deb ").then(|| {
                        l.split_whitespace()
                            .filter(|w| w.contains("://"))
                            .take(1)
                            .collect()
                    })
                })
                .unwrap_or_default()
        })
        .map(|uri| uri.trim_end_matches('/'))
        .find(|uri| uri.ends_with("/debian"))
        .map(str::to_owned)
}

/// `apt-get download` of the package `linux-image-amd64` depends on.
fn download_kernel_deb(cache: &Path, apt: &AptConfig) -> Result<PathBuf> {
    apt.update()?;
    let depends = apt
        .command("apt-cache")
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
    run(apt
        .command("apt-get")
        // The download goes to a directory the _apt user cannot write.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
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

/// Compressions a bzImage's payload can use: (name, magic, decompressor).
const COMPRESSIONS: &[(&str, &[u8], &[&str])] = &[
    ("xz", &[0xfd, b'7', b'z', b'X', b'Z', 0x00], &["xz", "-dc"]),
    ("zstd", &[0x28, 0xb5, 0x2f, 0xfd], &["zstd", "-dcq"]),
    ("gzip", &[0x1f, 0x8b], &["gzip", "-dc"]),
    ("lzma", &[0x5d, 0x00, 0x00], &["xz", "--format=lzma", "-dc"]),
    ("bzip2", b"BZh", &["bzip2", "-dc"]),
    ("lz4", &[0x02, 0x21, 0x4c, 0x18], &["lz4", "-dc"]),
];

/// Extracts the vmlinux from a bzImage: the boot protocol header (2.08+)
/// says where the compressed payload is; its last 4 bytes are the
/// decompressed size. Returns the compression's name.
fn decompress(bzimage: &Path, vmlinux: &Path) -> Result<&'static str> {
    let image = std::fs::read(bzimage)?;
    let (format, tool, payload, size) = payload(&image)?;
    let tmp = vmlinux.with_extension("tmp");
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&tmp)?)
        .spawn()
        .with_context(|| format!("{} (to decompress a {format} kernel)", tool[0]))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        // A decompressor may stop at the end of its stream and close early.
        let _ = stdin.write_all(payload);
    }
    ensure!(child.wait()?.success(), "{} failed", tool[0]);
    let out = std::fs::read(&tmp)?;
    ensure!(out.starts_with(b"\x7fELF"), "not an ELF vmlinux");
    ensure!(
        out.len() == size,
        "decompressed {} bytes, the header says {size}",
        out.len()
    );
    std::fs::rename(&tmp, vmlinux)?;
    Ok(format)
}

/// The compressed payload of a bzImage: (compression, decompressor, the
/// compressed stream, decompressed size).
fn payload(image: &[u8]) -> Result<(&'static str, &'static [&'static str], &[u8], usize)> {
    let u32_at = |at: usize| -> Result<usize> {
        let bytes = image.get(at..at + 4).context("bzImage too short")?;
        Ok(u32::from_le_bytes(bytes.try_into()?) as usize)
    };
    ensure!(
        image.get(0x202..0x206) == Some(b"HdrS"),
        "no Linux boot protocol header (not a bzImage)"
    );
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    ensure!(
        version >= 0x208,
        "boot protocol {version:#x} has no payload fields (2.08+ needed)"
    );
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let length = u32_at(0x24c)?;
    let payload = image
        .get(start..start + length)
        .context("payload outside the bzImage")?;
    ensure!(length > 4, "empty payload");
    let size = u32::from_le_bytes(payload[length - 4..].try_into()?) as usize;
    let (format, _, tool) = COMPRESSIONS
        .iter()
        .find(|(_, magic, _)| payload.starts_with(magic))
        .with_context(|| {
            format!(
                "unknown compression (payload starts {:02x?})",
                &payload[..payload.len().min(6)]
            )
        })?;
    // gzip's own trailer ends with the size; the others have it appended.
    let stream = if *format == "gzip" {
        payload
    } else {
        &payload[..length - 4]
    };
    Ok((format, tool, stream, size))
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

/// The guest's /init: mounts what the tests need, loads the sock_diag
/// modules, finds out which steering program this kernel accepts, runs
/// every test binary with markers around it, powers off. No tmpfs over
/// /tmp: the initramfs root is already writable memory, and `testserver`
/// sits at the host path the tests were compiled with, which is under /tmp
/// for a clone there. /run is mode 0755 (a tmpfs is 1777 by default):
/// the mode probe's control socket is there, and reloader refuses a
/// runtime directory others can write.
fn init_script(
    tests: &[(String, PathBuf)],
    testserver: &Path,
    test_args: &[String],
    repeat: u32,
) -> String {
    let skips: String = EXCLUDED
        .iter()
        .map(|(name, _)| format!(" --skip {name}"))
        .collect();
    let extra: String = test_args.iter().map(|a| format!(" {}", quote(a))).collect();
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1 RELOADER_BIN=/bin/reloader\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs -o mode=0755 tmpfs /run\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         if [ -d /lib/modules ]; then depmod; modprobe tcp_diag; modprobe udp_diag; fi\n\
         echo \"@@MODULES $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')\"\n\
         ip link set lo up\n\
         echo \"@@KERNEL $(uname -r)\"\n\
         /usr/sbin/nginx -v 2>&1 | sed 's/^/nginx| /'\n",
    );
    // Which program `reloader run` loads here: start it on a scratch port,
    // read the mode from its status, stop it. Its log line says it too.
    script.push_str(&format!(
        "reloader run --name vm-mode --control-socket /run/mode.sock --listen 127.0.0.1:9 \
         -- {testserver} --listen 127.0.0.1:9 >/run/mode.log 2>&1 &\n\
         mode=\n\
         i=0\n\
         while [ $i -lt 150 ] && [ -z \"$mode\" ]; do\n\
         \x20 sleep 0.2; i=$((i+1))\n\
         \x20 mode=$(reloader status --control-socket /run/mode.sock --json 2>/dev/null \
         | grep -o '\"steering\": *\"[a-z-]*\"' | grep -o '[a-z-]*\"$' | tr -d '\"')\n\
         done\n\
         reloader stop --control-socket /run/mode.sock >/dev/null 2>&1\n\
         wait\n\
         grep -e 'steering program loaded' -e 'select-or-migrate program' /run/mode.log \
         | sed 's/^/mode| /'\n\
         [ -n \"$mode\" ] || sed 's/^/mode| /' /run/mode.log\n\
         echo \"@@STEERING ${{mode:-unknown}}\"\n\
         na=\n",
        testserver = quote(&testserver.display().to_string()),
    ));
    let run: Vec<&str> = tests.iter().map(|(n, _)| n.as_str()).collect();
    let not_applicable: Vec<&str> = NEEDS_SELECT_OR_MIGRATE
        .iter()
        .filter(|(binary, _, _)| run.contains(binary))
        .map(|(_, test, _)| *test)
        .collect();
    if !not_applicable.is_empty() {
        script.push_str("if [ \"$mode\" = select-only ]; then\n");
        for test in not_applicable {
            script.push_str(&format!(
                "\x20 echo '@@NOTAPPLICABLE {test}'; na=\"$na --skip {test}\"\n"
            ));
        }
        script.push_str("fi\n");
    }
    script.push_str(&format!(
        "run=1\nwhile [ $run -le {} ]; do\n",
        repeat.max(1)
    ));
    for (name, _) in tests {
        script.push_str(&format!(
            "echo '@@BEGIN {name}'\n/tests/{name} --test-threads=1{skips} $na{extra}\n\
             echo \"@@END {name} $?\"\n"
        ));
    }
    script.push_str("run=$((run+1))\ndone\necho '@@ALLDONE'\npoweroff -f\n");
    script
}

/// Single-quotes `arg` for the guest's shell.
fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn make_initramfs(
    binaries: &Binaries,
    modules: Option<&Path>,
    vm_dir: &Path,
    options: &VmOptions,
) -> Result<PathBuf> {
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
    nginx::stage(&staging)?;
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
            copy_module(&modules.join(module), &into.join(format!("{module}.ko")))?;
        }
    }
    let init = staging.join("init");
    std::fs::write(
        &init,
        init_script(
            &binaries.tests,
            &binaries.testserver,
            &options.test_args,
            options.repeat,
        ),
    )?;
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

/// Copies `module` (a path without suffix) as a plain `.ko`, decompressing
/// `.ko.xz` (trixie), `.ko.zst` or `.ko.gz` on the host so the guest's
/// busybox needs no decompressor. A module the package lacks is left out
/// (then it is built in, or the guest's modprobe says it is missing).
fn copy_module(module: &Path, to: &Path) -> Result<()> {
    let with = |suffix: &str| PathBuf::from(format!("{}{suffix}", module.display()));
    for (suffix, tool) in [
        (".ko", None),
        (".ko.xz", Some("xz")),
        (".ko.zst", Some("zstd")),
        (".ko.gz", Some("gzip")),
    ] {
        let from = with(suffix);
        if !from.exists() {
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match tool {
            None => {
                std::fs::copy(&from, to).with_context(|| format!("copy {}", from.display()))?;
            }
            Some(tool) => {
                let status = Command::new(tool)
                    .arg("-dc")
                    .arg(&from)
                    .stdout(std::fs::File::create(to)?)
                    .status()
                    .with_context(|| format!("{tool} (to decompress {})", from.display()))?;
                ensure!(status.success(), "{tool} -dc {} failed", from.display());
            }
        }
        return Ok(());
    }
    Ok(())
}

/// What the guest reported.
#[derive(Default)]
struct Outcome {
    kernel: Option<String>,
    /// The steering program `reloader run` loaded in the guest:
    /// `select-or-migrate`, `select-only` or `unknown`.
    steering: Option<String>,
    /// Modules loaded in the guest.
    modules: Option<String>,
    /// Tests the guest skipped as not applicable to its steering mode.
    not_applicable: Vec<String>,
    /// A test whose result line has not come yet (`--nocapture`).
    pending: Option<String>,
    /// (binary, exit code)
    binaries: Vec<(String, i32)>,
    passed: Vec<String>,
    failed: Vec<String>,
    finished: bool,
    timed_out: bool,
    boot: Option<Duration>,
}

/// Boots `kernel` with `initramfs` and kernel command line `append`,
/// echoing and parsing the serial console until the guest powers off or
/// the timeout passes.
fn boot(kernel: &Path, initramfs: &Path, options: &VmOptions, append: &str) -> Result<Outcome> {
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
    .args(["-append", append]);
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
        // Firmware output can precede a marker on the same console line
        // (a test's own output can follow its name: that is no marker).
        let line = match line.find("@@") {
            Some(i) if !line.starts_with("test ") => &line[i..],
            _ => line,
        };
        if let Some(kernel) = line.strip_prefix("@@KERNEL ") {
            self.kernel = Some(kernel.to_owned());
            self.boot = Some(started.elapsed());
        } else if let Some(mode) = line.strip_prefix("@@STEERING ") {
            self.steering = Some(mode.trim().to_owned());
        } else if let Some(modules) = line.strip_prefix("@@MODULES") {
            self.modules = Some(modules.trim().to_owned());
        } else if let Some(test) = line.strip_prefix("@@NOTAPPLICABLE ") {
            self.not_applicable.push(test.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("@@END ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                self.binaries
                    .push((name.to_owned(), code.parse().unwrap_or(-1)));
            }
        } else if line == "@@ALLDONE" {
            self.finished = true;
        } else if let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|test| test.split_once(" ... "))
        {
            // With --nocapture a test's output follows "test NAME ... " on
            // the same line and its result comes on a line of its own.
            self.pending = None;
            match result {
                "ok" => self.passed.push(name.to_owned()),
                "FAILED" => self.failed.push(name.to_owned()),
                result if !result.starts_with("ignored") => {
                    self.pending = Some(name.to_owned());
                }
                _ => {}
            }
        } else if (line == "ok" || line == "FAILED")
            && let Some(name) = self.pending.take()
        {
            if line == "ok" {
                self.passed.push(name);
            } else {
                self.failed.push(name);
            }
        }
    }

    fn report(&self, phases: &Phases, total: Duration, excluded: &[(&str, &str)]) -> Result<()> {
        let kernel = self.kernel.as_deref().unwrap_or("?");
        let steering = self.steering.as_deref().unwrap_or("unknown");
        println!();
        println!(
            "vm: kernel {kernel}, steering {steering}, booted in {}, whole run {:.0}s",
            self.boot
                .map_or("-".into(), |b| format!("{:.1}s", b.as_secs_f64())),
            total.as_secs_f64()
        );
        println!(
            "vm: wall time: packages {:.0}s, kernel {:.0}s, build {:.0}s, initramfs {:.0}s, VM \
             {:.0}s (boot {}, tests {})",
            phases.packages.as_secs_f64(),
            phases.kernel.as_secs_f64(),
            phases.build.as_secs_f64(),
            phases.initramfs.as_secs_f64(),
            phases.vm.as_secs_f64(),
            self.boot
                .map_or("-".into(), |b| format!("{:.1}s", b.as_secs_f64())),
            self.boot.map_or("-".into(), |b| format!(
                "{:.0}s",
                phases.vm.saturating_sub(b).as_secs_f64()
            )),
        );
        if let Some(modules) = &self.modules {
            println!(
                "vm: modules loaded: {}",
                if modules.is_empty() { "none" } else { modules }
            );
        }
        for (name, code) in &self.binaries {
            println!("vm: test binary {name}: exit {code}");
        }
        if !excluded.is_empty() {
            println!("vm: excluded in the VM (and why):");
        }
        for (name, why) in excluded {
            println!("vm:   {name}: {why}");
        }
        if !self.not_applicable.is_empty() {
            println!("vm: not applicable on {kernel} ({steering} steering):");
            for name in &self.not_applicable {
                println!("vm:   {name}: {}", not_applicable_reason(name));
            }
        }
        for name in &self.failed {
            println!("vm: FAILED {name}");
        }
        let mut runs: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for name in &self.passed {
            runs.entry(name).or_default().0 += 1;
        }
        for name in &self.failed {
            runs.entry(name).or_default().1 += 1;
        }
        if runs.values().any(|(passed, failed)| passed + failed > 1) {
            for (name, (passed, failed)) in &runs {
                println!("vm: {name}: {passed} passed, {failed} failed");
            }
        }
        println!(
            "vm: {} passed, {} failed",
            self.passed.len(),
            self.failed.len()
        );
        if !self.not_applicable.is_empty() {
            println!(
                "vm: {} not applicable on {kernel} (neither passed nor failed)",
                self.not_applicable.len()
            );
        }
        if self.timed_out {
            bail!("the VM did not finish within the timeout");
        }
        ensure!(
            self.finished,
            "the VM stopped before running every test binary"
        );
        ensure!(
            self.steering.as_deref().is_some_and(|m| m != "unknown"),
            "the guest could not tell which steering program loads (see the `mode|` lines above: \
             `reloader run` failed in the guest)"
        );
        ensure!(
            self.not_applicable.is_empty() || steering == "select-only",
            "tests were skipped as not applicable under {steering} steering"
        );
        let ran_anyway: Vec<&String> = self
            .not_applicable
            .iter()
            .filter(|n| self.passed.contains(n) || self.failed.contains(n))
            .collect();
        ensure!(
            ran_anyway.is_empty(),
            "tests reported not applicable ran anyway: {ran_anyway:?}"
        );
        ensure!(
            self.failed.is_empty() && self.binaries.iter().all(|(_, c)| *c == 0),
            "tests failed in the VM"
        );
        ensure!(!self.passed.is_empty(), "no test ran in the VM");
        Ok(())
    }
}

fn not_applicable_reason(test: &str) -> &'static str {
    NEEDS_SELECT_OR_MIGRATE
        .iter()
        .find(|(_, name, _)| *name == test)
        .map_or("(not in NEEDS_SELECT_OR_MIGRATE)", |(_, _, why)| why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(lines: &[&str]) -> Outcome {
        let mut o = Outcome::default();
        let t = Instant::now();
        for line in lines {
            o.parse(line, t);
        }
        o
    }

    fn report(o: &Outcome) -> Result<()> {
        o.report(&Phases::default(), Duration::ZERO, EXCLUDED)
    }

    #[test]
    fn the_serial_console_is_parsed_into_results() {
        let o = parsed(&[
            "Booting from ROM..@@MODULES udp_diag tcp_diag inet_diag ",
            "@@KERNEL 6.1.0-56-amd64",
            "mode| 2026-11-23T20:22:33Z INFO steering program loaded mode=select-or-migrate",
            "@@STEERING select-or-migrate",
            "@@BEGIN steering",
            "test a ... ok",
            "test b ... FAILED",
            "@@END steering 101",
            "@@ALLDONE",
        ]);
        assert_eq!(o.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(o.steering.as_deref(), Some("select-or-migrate"));
        assert_eq!(o.modules.as_deref(), Some("udp_diag tcp_diag inet_diag"));
        assert_eq!((o.passed.len(), o.failed.len()), (1, 1));
        assert_eq!(o.binaries, vec![("steering".to_owned(), 101)]);
        assert!(o.finished);
        assert!(report(&o).is_err(), "a failure fails the run");
    }

    #[test]
    fn a_vm_that_stops_early_fails_the_run() {
        let o = parsed(&["@@STEERING select-or-migrate", "test a ... ok"]);
        assert!(report(&o).is_err());
    }

    #[test]
    fn results_after_a_tests_own_output_are_counted() {
        let o = parsed(&[
            "test m ... @@MEASURE settle=1s failed=0",
            "@@MEASURE settle=2s failed=0",
            "ok",
            "test n ... printed",
            "FAILED",
            "test i ... ignored, measurement",
            "ok",
        ]);
        assert_eq!(o.passed, ["m"]);
        assert_eq!(o.failed, ["n"]);
    }

    const SELECT_ONLY_RUN: &[&str] = &[
        "@@KERNEL 5.10.0-32-amd64",
        "@@STEERING select-only",
        "@@NOTAPPLICABLE accept_queue_migrates_when_the_old_listener_closes",
        "@@NOTAPPLICABLE loads_select_or_migrate_on_this_kernel",
        "@@BEGIN steering",
        "test new_connections_follow_the_active_slot ... ok",
        "@@END steering 0",
        "@@ALLDONE",
    ];

    #[test]
    fn not_applicable_tests_are_counted_apart_and_pass_the_run() {
        let o = parsed(SELECT_ONLY_RUN);
        assert_eq!(
            o.not_applicable,
            [
                "accept_queue_migrates_when_the_old_listener_closes",
                "loads_select_or_migrate_on_this_kernel"
            ]
        );
        assert_eq!((o.passed.len(), o.failed.len()), (1, 0));
        report(&o).unwrap();
        assert!(
            not_applicable_reason("accept_queue_migrates_when_the_old_listener_closes")
                .contains("Linux >= 5.14")
        );
    }

    #[test]
    fn a_not_applicable_test_that_ran_anyway_fails_the_run() {
        let mut lines = SELECT_ONLY_RUN.to_vec();
        lines.insert(5, "test loads_select_or_migrate_on_this_kernel ... ok");
        let error = report(&parsed(&lines)).unwrap_err();
        assert!(error.to_string().contains("ran anyway"), "{error}");
    }

    #[test]
    fn skipping_tests_under_select_or_migrate_fails_the_run() {
        let lines: Vec<&str> = SELECT_ONLY_RUN
            .iter()
            .map(|l| {
                if l.starts_with("@@STEERING") {
                    "@@STEERING select-or-migrate"
                } else {
                    l
                }
            })
            .collect();
        assert!(report(&parsed(&lines)).is_err());
    }

    #[test]
    fn an_unknown_steering_mode_fails_the_run() {
        let o = parsed(&[
            "@@STEERING unknown",
            "test a ... ok",
            "@@END steering 0",
            "@@ALLDONE",
        ]);
        let error = report(&o).unwrap_err();
        assert!(error.to_string().contains("mode|"), "{error}");
    }

    /// Renaming a test must not silently turn its "not applicable" entry
    /// into a no-op `--skip`.
    #[test]
    fn every_not_applicable_test_exists_and_asserts_the_mode() {
        let sources = [
            ("steering", include_str!("../../tests/steering.rs")),
            ("rollout", include_str!("../../tests/rollout.rs")),
            ("launcher", include_str!("../../tests/launcher.rs")),
            ("inject", include_str!("../../tests/inject.rs")),
        ];
        for (binary, test, reason) in NEEDS_SELECT_OR_MIGRATE {
            let (_, source) = sources
                .iter()
                .find(|(b, _)| b == binary)
                .unwrap_or_else(|| panic!("add tests/{binary}.rs to this test"));
            let start = source
                .find(&format!("fn {test}()"))
                .unwrap_or_else(|| panic!("tests/{binary}.rs has no test {test}"));
            let body = &source[start..];
            let body = &body[..body.find("\n}\n").unwrap_or(body.len())];
            assert!(
                body.contains("load_select_or_migrate()")
                    || body.contains("half_open_migration(")
                    || body.contains("assert_select_or_migrate(")
                    || body.contains("failing_test_server(")
                    || body.contains("start_injected("),
                "{test} must assert the select-or-migrate mode"
            );
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn the_init_script_skips_not_applicable_tests_only_under_select_only() {
        let tests = vec![
            ("reliability".to_owned(), PathBuf::from("/x")),
            ("steering".to_owned(), PathBuf::from("/y")),
        ];
        let script = init_script(
            &tests,
            Path::new("/tmp/t/testserver"),
            &["--ignored".into()],
            1,
        );
        assert!(script.contains("if [ \"$mode\" = select-only ]; then"));
        // A world-writable /run made the mode probe's `reloader run` refuse
        // to start, and every run fail with steering "unknown".
        assert!(script.contains("mount -t tmpfs -o mode=0755 tmpfs /run"));
        assert!(
            script.contains(
                "echo '@@NOTAPPLICABLE accept_queue_migrates_when_the_old_listener_closes'"
            )
        );
        assert!(script.contains("/tests/steering --test-threads=1"));
        assert!(script.contains(" $na '--ignored'\n"));
        assert!(script.contains("-- '/tmp/t/testserver' --listen 127.0.0.1:9"));
        // No steering binary, no not-applicable list.
        let script = init_script(&tests[..1], Path::new("/t"), &[], 3);
        assert!(script.contains("while [ $run -le 3 ]; do"));
        assert!(!script.contains("@@NOTAPPLICABLE"));
    }

    #[test]
    fn kernel_choices() {
        assert_eq!(
            KernelChoice::parse("trixie").unwrap(),
            KernelChoice::Suite("trixie")
        );
        assert_eq!(
            KernelChoice::parse("/").unwrap(),
            KernelChoice::File("/".into())
        );
        let error = KernelChoice::parse("buster").unwrap_err().to_string();
        assert!(error.contains("bullseye, bookworm, trixie"), "{error}");
    }

    #[test]
    fn the_hosts_debian_mirror_is_found() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(
            debian_mirror(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "deb-src http://x/debian bookworm main\n\
                        deb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            debian_mirror(one_line).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            debian_mirror("deb https://packages.cloud.google.com/apt x main"),
            None
        );
    }

    /// A minimal bzImage: boot protocol 2.15 header, payload after one
    /// setup sector, size trailer.
    fn bzimage(payload: &[u8], size: u32) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        let length = payload.len() as u32 + 4;
        image[0x24c..0x250].copy_from_slice(&length.to_le_bytes());
        image.extend_from_slice(&[0xaa; 16]);
        image.extend_from_slice(payload);
        image.extend_from_slice(&size.to_le_bytes());
        image.extend_from_slice(b"trailing");
        image
    }

    #[test]
    fn the_payload_is_found_from_the_boot_header() {
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3];
        let image = bzimage(&zstd, 1234);
        let (format, tool, stream, size) = payload(&image).unwrap();
        assert_eq!(
            (format, tool[0], stream, size),
            ("zstd", "zstd", &zstd[..], 1234)
        );
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0x00, 9];
        assert_eq!(payload(&bzimage(&xz, 1)).unwrap().0, "xz");
        let error = payload(&bzimage(&[1, 2, 3], 1)).unwrap_err().to_string();
        assert!(error.contains("unknown compression"), "{error}");
        assert!(payload(b"\x7fELF not a bzImage").is_err());
    }
}
