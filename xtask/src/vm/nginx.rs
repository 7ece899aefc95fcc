//! Debian's nginx in the guest, for the tests that wrap it
//! (`tests/src/nginx.rs` writes their configs): the host's
//! `/usr/sbin/nginx`, the shared libraries `ldd` lists and the dynamic
//! loader, each at its host path (the guest has no `ld.so.cache`; Debian's
//! loader searches `/lib/x86_64-linux-gnu` and `/usr/lib/x86_64-linux-gnu`
//! by itself), plus what nginx needs at run time with those configs:
//! `/etc/passwd` and `/etc/group`. Started as root, nginx switches its
//! workers to the compiled-in user `nobody` and group `nogroup` (Debian's
//! `nginx -V` names none) and refuses to start when `getpwnam("nobody")`
//! or `getgrnam("nogroup")` fails (glibc ≥ 2.34 reads the files without an
//! NSS module or `nsswitch.conf`). Nothing else: the configs send the error
//! log to stderr, turn the access log off and put the temp paths and the
//! pid file in the test's own directory (tried in a chroot holding only
//! the binary, its libraries and those two files).
//!
//! The binary is whatever the host has (`nginx-light` from `cargo xtask
//! test-deps`, or installed here when missing), so the guest runs the same
//! nginx version as the host's tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::deps::NGINX;

/// The user and group nginx's workers run as (and root, who runs the tests).
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// Puts nginx and what it needs under `staging` (the initramfs root).
pub fn stage(staging: &Path) -> Result<()> {
    ensure!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: the VM's nginx tests run the host's nginx (`cargo xtask \
         test-deps` or `apt-get install nginx-light`)"
    );
    let output = Command::new("ldd")
        .arg(NGINX)
        .output()
        .context("ldd (to list nginx's shared libraries)")?;
    ensure!(
        output.status.success(),
        "ldd {NGINX} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let libraries = shared_objects(&String::from_utf8_lossy(&output.stdout))?;
    let mut files = vec![PathBuf::from(NGINX)];
    files.extend(libraries);
    for file in &files {
        let to = staging.join(file.strip_prefix("/")?);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Follows symlinks: the guest gets the library under the name the
        // loader asks for.
        std::fs::copy(file, &to).with_context(|| format!("copy {}", file.display()))?;
    }
    std::fs::create_dir_all(staging.join("etc"))?;
    std::fs::write(staging.join("etc/passwd"), PASSWD)?;
    std::fs::write(staging.join("etc/group"), GROUP)?;
    Ok(())
}

/// The files `ldd` names: every `NAME => PATH (ADDR)` and the loader's
/// `PATH (ADDR)`; the vDSO (no path) is skipped. A library it cannot find
/// fails, naming it.
fn shared_objects(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd {NGINX}: {} not found on this host", name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    ensure!(
        files.iter().any(|f| f
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))),
        "ldd {NGINX} names no dynamic loader:\n{ldd}"
    );
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibcrypt.so.1 => /lib/x86_64-linux-gnu/libcrypt.so.1 (0x00007f80)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f81)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f82)\n";
        assert_eq!(
            shared_objects(ldd).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libcrypt.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_library_is_named() {
        let ldd = "\tlibpcre2-8.so.0 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        let error = shared_objects(ldd).unwrap_err().to_string();
        assert!(error.contains("libpcre2-8.so.0 not found"), "{error}");
        assert!(shared_objects("\tlinux-vdso.so.1 (0x1)\n").is_err());
    }
}
