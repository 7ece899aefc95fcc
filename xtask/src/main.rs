//! Developer tasks: `cargo xtask <task>`.
//!
//! The eBPF object is built by a different compiler than the rest of the
//! workspace: Debian's `rustc-web` (1.96) ships a prebuilt `core` for the bpf
//! targets, which the machine's rustup toolchain lacks, and aya-ebpf needs
//! unstable features (`RUSTC_BOOTSTRAP=1`). The object is committed, so
//! building and testing `reloader` needs only stable Rust; `check-ebpf`
//! proves the committed bytes are what the source builds to.

mod bench;
mod chaos;
mod deps;
mod dist;
mod ebpf;
mod idle;
mod links;
mod modcycles;
mod soak;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "reloader's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs on Debian (idempotent): rustc-web,
    /// cargo-web, libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker 0.13.0.
    EbpfToolchain,
    /// Build the steering program and write the object that `reloader`
    /// embeds (reloader/ebpf/steer.bpf.o).
    BuildEbpf,
    /// Rebuild the steering program in a scratch directory and fail if it
    /// differs from the committed object.
    CheckEbpf,
    /// Many reloads under load with the test server and nginx, watching the
    /// controller for leaks (fds, RSS, threads, map entries). As root.
    Soak {
        /// Reloads per server.
        #[arg(long, default_value_t = 1000)]
        reloads: usize,
        /// Servers to soak: testserver, nginx.
        #[arg(long, value_delimiter = ',', default_value = "testserver,nginx")]
        servers: Vec<String>,
    },
    /// The privileged integration tests: on this host (as root), or with
    /// --vm inside a QEMU guest running a Debian kernel.
    IntegrationTest {
        /// Run them in a VM (Debian's current linux-image-amd64 by default).
        #[arg(long)]
        vm: bool,
        /// Kernel for --vm: a Debian release (bullseye: 5.10, bookworm: 6.1,
        /// trixie: 6.12; its linux-image-amd64, downloaded with the
        /// runner's own apt configuration), a bzImage/vmlinux, or a
        /// linux-image-*.deb [default: the host apt's linux-image-amd64].
        #[arg(long, value_name = "RELEASE|PATH", value_parser = vm::KernelChoice::parse)]
        kernel: Option<vm::KernelChoice>,
        /// Use KVM instead of TCG (hangs on some hosts).
        #[arg(long)]
        kvm: bool,
        /// Give up on the VM after this many minutes.
        #[arg(long, default_value_t = 25)]
        timeout_minutes: u64,
        /// With --vm: run only these test binaries (steering, launcher,
        /// ecosystem, reliability, config).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// With --vm: extra arguments for every test binary, split at
        /// whitespace (e.g. "--ignored --nocapture NAME").
        #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
        test_args: Option<String>,
        /// With --vm: run each test binary this many times in one boot
        /// (loops of a rare failure; each run's result is counted).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
    /// Run every test: unit tests and the privileged integration tests
    /// (those need root: they use the real kernel's BPF and network
    /// namespaces). Installs the servers the tests wrap when missing
    /// (Debian packages, and PyPI packages into target/venv).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fail when modules of the reloader crate import each other in a
    /// circle.
    Modcycles,
    /// Fail when a relative link in README.md, BENCHMARKS.md or docs/*.md
    /// names a missing file or a heading its target does not have.
    Links,
    /// Inject faults at random (reproducibly, from the seed) into an
    /// instance under load and check that nothing is lost beyond what the
    /// faults themselves killed, nothing outside the instance is signalled
    /// and nothing leaks. As root.
    Chaos(chaos::ChaosArgs),
    /// Install what the test suites need when missing (`test` does this
    /// first): the real servers they wrap, from Debian and PyPI.
    TestDeps,
    /// Measure reloads under load: plain SO_REUSEPORT, with
    /// net.ipv4.tcp_migrate_req=1, and with reloader, for the test server
    /// and nginx; plus steering overhead, cutover latency and an idle
    /// controller's cost (root; writes a table, JSON and an SVG plot).
    Bench(bench::BenchArgs),
    /// An idle controller's wake-ups per second without and with --watch
    /// (root; three cases of --seconds each).
    Idle {
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Build the Debian package (cargo-deb, installed into target/tools
    /// when missing): /usr/bin/reloader, reloader@.service, a man page per
    /// command, bash/zsh/fish completions; upgrades hand running instances
    /// over instead of restarting them.
    Dist(dist::DistArgs),
    /// The Debian package under a real systemd: a QEMU guest (TCG) boots a
    /// Debian bookworm root (mmdebstrap, cached in target/vm/systemd) with
    /// systemd as PID 1, installs the package with dpkg and tests
    /// reloader@nginx: start, reload, a killed controller, an upgrade of
    /// the package under load, stop. As root.
    SystemdTest(vm::systemd::SystemdArgs),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::EbpfToolchain => ebpf::install_toolchain(),
        Task::BuildEbpf => ebpf::build(),
        Task::CheckEbpf => ebpf::check(),
        Task::Test { args } => test(&args),
        Task::Idle { seconds } => idle::run(seconds),
        Task::Dist(args) => dist::build(&args).map(drop),
        Task::SystemdTest(args) => vm::systemd::systemd_test(&args),
        Task::Modcycles => modcycles::check(&workspace_root().join("reloader/src")),
        Task::Links => links::check(&workspace_root()),
        Task::Chaos(args) => chaos::run_chaos(args),
        Task::TestDeps => deps::install(),
        Task::Soak { reloads, servers } => soak::soak(reloads, &servers),
        Task::Bench(args) => bench::run(args, &workspace_root()),
        Task::IntegrationTest {
            vm: true,
            kernel,
            kvm,
            timeout_minutes,
            only,
            test_args,
            repeat,
        } => vm::integration_test(&vm::VmOptions {
            kernel: kernel.unwrap_or(vm::KernelChoice::Host),
            kvm,
            timeout: std::time::Duration::from_secs(timeout_minutes * 60),
            only,
            test_args: test_args
                .iter()
                .flat_map(|a| a.split_whitespace().map(str::to_owned))
                .collect(),
            repeat,
        }),
        Task::IntegrationTest { vm: false, .. } => integration_test_on_host(),
    }
}

fn test(args: &[String]) -> Result<()> {
    deps::install()?;
    // The launcher tests run the real `reloader` binary.
    run(std::process::Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--bins"]))?;
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace", "--all-targets"])
        .args(args);
    run(&mut cmd)
}

fn integration_test_on_host() -> Result<()> {
    deps::install()?;
    run(std::process::Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--bins"]))?;
    run(std::process::Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["test", "-p", "reloader-tests"]))
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut std::process::Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("failed to start {:?}: {e}", cmd.get_program()))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}
