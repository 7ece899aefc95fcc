//! Developer tasks: `cargo xtask <task>`.
//!
//! The eBPF object is built by a different compiler than the rest of the
//! workspace: Debian's `rustc-web` (1.96) ships a prebuilt `core` for the bpf
//! targets, which the machine's rustup toolchain lacks, and aya-ebpf needs
//! unstable features (`RUSTC_BOOTSTRAP=1`). The object is committed, so
//! building and testing `reloader` needs only stable Rust; `check-ebpf`
//! proves the committed bytes are what the source builds to.

mod ebpf;
mod soak;

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
    /// Run every test: unit tests and the privileged integration tests
    /// (those need root: they use the real kernel's BPF and network
    /// namespaces).
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
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::EbpfToolchain => ebpf::install_toolchain(),
        Task::BuildEbpf => ebpf::build(),
        Task::CheckEbpf => ebpf::check(),
        Task::Test { args } => test(&args),
        Task::Soak { reloads, servers } => soak::soak(reloads, &servers),
    }
}

fn test(args: &[String]) -> Result<()> {
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
