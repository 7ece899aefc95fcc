//! Config identity (`--config`): one sha256 digest for the files a
//! generation was started with, recorded with the generation, so that
//! `status`, `reload --wait` and the metrics say which configuration every
//! replica serves.
//!
//! The digest must be reproducible by anyone with a shell and coreutils,
//! without reloader: it is the sha256 of exactly what `sha256sum` prints
//! for the files, by absolute path, in byte order, each once:
//!
//! ```sh
//! printf '%s\0' FILES | LC_ALL=C sort -zu | xargs -0 sha256sum | sha256sum
//! ```
//!
//! (for paths without whitespace, `sha256sum $(printf '%s\n' FILES |
//! LC_ALL=C sort -u) | sha256sum` is the same). Each line is `HEX  PATH\n`;
//! a path with a backslash, newline or carriage return is printed the way
//! coreutils ≥ 9.0 prints it (the line starts with `\`, those characters
//! escaped).
//!
//! FILES: a `--config` file is itself (its path made absolute, symlinks in
//! it not resolved: `sha256sum` reads through them); a directory is every
//! regular file reached from it following symlinks, skipping entries whose
//! name starts with `..` — `find -L DIR -name '..?*' -prune -o -type f
//! -print`. The skip is for Kubernetes ConfigMap and Secret volumes: their
//! files are symlinks `f -> ..data/f`, `..data` a symlink to a timestamped
//! directory `..2026_01_02_03_04_05.123` that an update replaces. Counting
//! `f` once by its stable name makes the digest depend on the content only,
//! not on the timestamp of the update that delivered it. A directory loop
//! (a symlink to an ancestor) is not entered again.
//!
//! Reading the files is blocking work: callers run [`config_sha256`] on a
//! blocking thread.

#![allow(clippy::disallowed_methods)] // hashing reads files: called on blocking threads only

use std::{
    collections::BTreeSet,
    io::Read,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Why the digest of the `--config` files could not be made.
#[derive(Debug, Error)]
pub enum DigestError {
    /// A `--config` path, or a file or directory under it, cannot be read.
    #[error("--config: cannot read {}", path.display())]
    ReadError {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The paths name no regular file at all (empty directories).
    #[error("--config {}: no regular file to hash", list(paths))]
    NoFiles { paths: Vec<PathBuf> },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The digest of `paths` (absolute; files or directories), as lowercase hex.
pub fn config_sha256(paths: &[PathBuf]) -> Result<String, DigestError> {
    let files = files(paths)?;
    if files.is_empty() {
        return Err(DigestError::NoFiles {
            paths: paths.to_vec(),
        });
    }
    let mut outer = Sha256::new();
    for file in &files {
        let inner = file_sha256(file)?;
        outer.update(sha256sum_line(&inner, file));
    }
    Ok(hex(&outer.finalize()))
}

/// FILES of the module comment: every file the digest covers, absolute,
/// sorted by bytes (`LC_ALL=C sort -u`).
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DigestError> {
    let mut found = BTreeSet::new();
    for path in paths {
        let read_error = |source| DigestError::ReadError {
            path: path.clone(),
            source,
        };
        // Follows symlinks, like `sha256sum` and `find -L` do.
        let meta = std::fs::metadata(path).map_err(read_error)?;
        if meta.is_dir() {
            walk(path, &mut vec![(meta.dev(), meta.ino())], &mut found)?;
        } else {
            found.insert(path.clone());
        }
    }
    // BTreeSet<PathBuf> orders by components, not by bytes ("a/b" before
    // "a-c" here, after it for `sort`): sort the bytes.
    let mut files: Vec<PathBuf> = found.into_iter().collect();
    files.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    Ok(files)
}

/// Adds the regular files under `dir` to `found`; `ancestors` are the
/// directories being walked (device, inode), so a loop is entered once.
fn walk(
    dir: &Path,
    ancestors: &mut Vec<(u64, u64)>,
    found: &mut BTreeSet<PathBuf>,
) -> Result<(), DigestError> {
    let read_error = |path: &Path, source| DigestError::ReadError {
        path: path.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(|e| read_error(dir, e))? {
        let entry = entry.map_err(|e| read_error(dir, e))?;
        if entry.file_name().as_bytes().starts_with(b"..") {
            continue;
        }
        let path = entry.path();
        // A dangling symlink is no regular file (`find -L -type f` skips it).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let id = (meta.dev(), meta.ino());
            if ancestors.contains(&id) {
                continue;
            }
            ancestors.push(id);
            walk(&path, ancestors, found)?;
            ancestors.pop();
        } else if meta.is_file() {
            found.insert(path);
        }
    }
    Ok(())
}

fn file_sha256(path: &Path) -> Result<[u8; 32], DigestError> {
    let read_error = |source| DigestError::ReadError {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// The line `sha256sum` prints for `path` with digest `sha`.
pub fn sha256sum_line(sha: &[u8], path: &Path) -> Vec<u8> {
    let name = path.as_os_str().as_bytes();
    let escape = name.iter().any(|b| matches!(b, b'\\' | b'\n' | b'\r'));
    let mut line = Vec::with_capacity(name.len() + 68);
    if escape {
        line.push(b'\\');
    }
    line.extend_from_slice(hex(sha).as_bytes());
    line.extend_from_slice(b"  ");
    for &b in name {
        match b {
            b'\\' if escape => line.extend_from_slice(b"\\\\"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            _ => line.push(b),
        }
    }
    line.push(b'\n');
    line
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const EMPTY_SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn one_line_per_file_as_sha256sum_prints_it() {
        let sha: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(
            sha256sum_line(&sha, Path::new("/etc/x.conf")),
            format!("{EMPTY_SHA}  /etc/x.conf\n").into_bytes()
        );
        assert_eq!(
            sha256sum_line(&sha, Path::new("/etc/a\\b\nc")),
            format!("\\{EMPTY_SHA}  /etc/a\\\\b\\nc\n").into_bytes()
        );
    }

    #[test]
    fn the_digest_is_the_sha256_of_the_sha256sum_lines_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a-c"), dir.path().join("a"));
        std::fs::create_dir(&b).unwrap();
        let b = b.join("b");
        std::fs::write(&a, "one\n").unwrap();
        std::fs::write(&b, "two\n").unwrap();
        // "…/a-c" sorts before "…/a/b" by bytes ('-' < '/').
        let mut expected = Vec::new();
        for path in [&a, &b] {
            let sha: [u8; 32] = Sha256::digest(std::fs::read(path).unwrap()).into();
            expected.extend(sha256sum_line(&sha, path));
        }
        let expected = hex(&Sha256::digest(&expected));
        assert_eq!(config_sha256(&[b.clone(), a.clone()]).unwrap(), expected);
        assert_eq!(
            config_sha256(&[a.clone(), b.clone(), a.clone()]).unwrap(),
            expected,
            "order given and repeats do not matter"
        );
        assert_eq!(
            config_sha256(&[dir.path().to_owned()]).unwrap(),
            expected,
            "a directory is the regular files under it"
        );
        std::fs::write(&a, "one!\n").unwrap();
        assert_ne!(config_sha256(&[a, b]).unwrap(), expected, "content counts");
    }

    #[test]
    fn a_configmap_volume_counts_its_visible_files_once() {
        // The layout kubelet's atomic writer makes.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ts1 = d.join("..2026_01_01_00_00_00.1");
        std::fs::create_dir(&ts1).unwrap();
        std::fs::write(ts1.join("nginx.conf"), "v1\n").unwrap();
        symlink("..2026_01_01_00_00_00.1", d.join("..data")).unwrap();
        symlink("..data/nginx.conf", d.join("nginx.conf")).unwrap();
        symlink("missing", d.join("dangling")).unwrap();
        symlink(".", d.join("loop")).unwrap();
        assert_eq!(files(&[d.to_owned()]).unwrap(), vec![d.join("nginx.conf")]);
        let v1 = config_sha256(&[d.to_owned()]).unwrap();
        // An update with the same content under a new timestamp: same digest.
        let ts2 = d.join("..2026_01_02_00_00_00.2");
        std::fs::create_dir(&ts2).unwrap();
        std::fs::write(ts2.join("nginx.conf"), "v1\n").unwrap();
        symlink("..2026_01_02_00_00_00.2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(&ts1).unwrap();
        assert_eq!(config_sha256(&[d.to_owned()]).unwrap(), v1);
        std::fs::write(ts2.join("nginx.conf"), "v2\n").unwrap();
        assert_ne!(config_sha256(&[d.to_owned()]).unwrap(), v1);
    }

    #[test]
    fn unreadable_and_empty_configs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.conf");
        let e = config_sha256(std::slice::from_ref(&missing)).unwrap_err();
        assert!(e.to_string().contains("missing.conf"), "{e}");
        let e = config_sha256(&[dir.path().to_owned()]).unwrap_err();
        assert!(matches!(e, DigestError::NoFiles { .. }), "{e}");
    }
}
