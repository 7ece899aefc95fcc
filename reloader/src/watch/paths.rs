//! What a `--watch PATH` means in directories and names: which directories
//! get an inotify watch, which events in them are about PATH, and whether
//! PATH is safe to follow.
//!
//! A file is watched through its *directory*, never by itself: an inotify
//! watch holds an inode, and the usual ways to update a file replace the
//! inode — an editor or `sed -i` writes a temporary file and renames it
//! over the old one; a Kubernetes ConfigMap volume keeps `f -> ..data/f`
//! and swaps `..data` (a symlink to a timestamped directory) by renaming a
//! new symlink over it. So an event is about file `F` in directory `P`
//! when it names `F`'s name in `P`, or the first component of `F`'s
//! symlink target when that stays in `P` (`..data` for `..data/f`). A
//! directory `D` is watched itself and in every subdirectory (new ones are
//! added after each change), skipping `..`-prefixed ones (the ConfigMap's
//! timestamped copies: their swap shows in `D` itself), and through its
//! parent, for a `D` that is renamed over as a whole.
//!
//! reloader runs as root and a change makes it run the server's command
//! again: a watched path must not be one another user can change. So the
//! directory holding a watched file, a watched directory, and every
//! directory above them (as named and as resolved) must be owned by root
//! or by us and not writable by another user; above the watched directory
//! itself, a sticky directory (`/tmp`) is allowed, since nobody else can
//! rename or remove what we own in it.

#![allow(clippy::disallowed_methods)] // path checks, on blocking threads only (`Watcher::start`, `wanted`)

use std::{
    ffi::OsStr,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use thiserror::Error;

/// Why a `--watch` path is refused at start.
#[derive(Debug, Error)]
pub enum WatchError {
    /// The path does not exist (or cannot be looked at).
    #[error("--watch {}: cannot use it (it must exist when reloader starts)", path.display())]
    MissingError {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path, or a directory above it, can be changed by another user.
    #[error(
        "--watch {}: {} is {why}: another user could change what reloader reloads; \
         make it owned by root and not writable by others (chmod go-w), or watch another path",
        path.display(),
        dir.display()
    )]
    UnsafePath {
        path: PathBuf,
        dir: PathBuf,
        why: String,
    },
    /// inotify could not be set up.
    #[error("--watch: cannot watch {}", path.display())]
    InotifyError {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `--watch` path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A file (or anything not a directory), seen through its directory.
    File {
        path: PathBuf,
        dir: PathBuf,
        name: PathBuf,
    },
    /// A directory, seen in itself, its subdirectories and its parent.
    Dir {
        path: PathBuf,
        parent: Option<PathBuf>,
        name: Option<PathBuf>,
    },
}

impl Target {
    /// Looks at absolute `path` and checks it is safe to follow.
    pub fn of(path: &Path) -> Result<Self, WatchError> {
        let missing = |source| WatchError::MissingError {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(missing)?;
        let (parent, name) = (path.parent(), path.file_name());
        let target = if meta.is_dir() {
            check_dir(path, path)?;
            Self::Dir {
                path: path.to_owned(),
                parent: parent.map(Path::to_owned),
                name: name.map(PathBuf::from),
            }
        } else {
            let (Some(dir), Some(name)) = (parent, name) else {
                return Err(missing(std::io::ErrorKind::InvalidInput.into()));
            };
            check_dir(path, dir)?;
            // Where it really is (through symlinks) must be safe too.
            let real = std::fs::canonicalize(path).map_err(missing)?;
            if let Some(real_dir) = real.parent() {
                check_dir(path, real_dir)?;
            }
            // And the file itself: whoever can write it can make reloader
            // reload (and decide what the new generation runs with).
            if let Some(why) = unsafe_file(&real) {
                return Err(WatchError::UnsafePath {
                    path: path.to_owned(),
                    dir: real,
                    why,
                });
            }
            Self::File {
                path: path.to_owned(),
                dir: dir.to_owned(),
                name: PathBuf::from(name),
            }
        };
        Ok(target)
    }

    /// The directories to watch now: (directory, whether its whole tree).
    pub fn dirs(&self) -> Vec<(PathBuf, bool)> {
        match self {
            Self::File { dir, .. } => vec![(dir.clone(), false)],
            Self::Dir { path, parent, .. } => {
                let mut dirs: Vec<(PathBuf, bool)> =
                    parent.iter().map(|p| (p.clone(), false)).collect();
                dirs.push((path.clone(), true));
                dirs
            }
        }
    }

    /// Whether an event for `name` in watched directory `dir` (no name: the
    /// directory itself) is about this target.
    pub fn is_about(&self, dir: &Path, name: Option<&OsStr>) -> bool {
        match self {
            Self::File {
                path,
                dir: own_dir,
                name: own_name,
            } => {
                dir == own_dir
                    && name.is_some_and(|n| {
                        n == own_name.as_os_str() || Some(n) == swapped_link(path).as_deref()
                    })
            }
            Self::Dir {
                path,
                parent,
                name: own_name,
            } => {
                dir.starts_with(path)
                    || (parent.as_deref() == Some(dir)
                        && name
                            .is_some_and(|n| Some(n) == own_name.as_deref().map(Path::as_os_str)))
            }
        }
    }
}

/// For a symlink `f -> ..data/f`: `..data`, the name in `f`'s own directory
/// whose swap changes what `f` is.
fn swapped_link(path: &Path) -> Option<std::ffi::OsString> {
    let target = std::fs::read_link(path).ok()?;
    match target.components().next()? {
        Component::Normal(first) if target.components().count() > 1 => Some(first.to_owned()),
        _ => None,
    }
}

/// Checks `dir` (holding or being the watched `path`) and the directories
/// above it, as named and as resolved.
fn check_dir(path: &Path, dir: &Path) -> Result<(), WatchError> {
    let resolved = std::fs::canonicalize(dir).map_err(|source| WatchError::MissingError {
        path: path.to_owned(),
        source,
    })?;
    for chain in [dir, resolved.as_path()] {
        for (i, ancestor) in chain.ancestors().enumerate() {
            if let Some(why) = unsafe_dir(ancestor, i == 0) {
                return Err(WatchError::UnsafePath {
                    path: path.to_owned(),
                    dir: ancestor.to_owned(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Why another user could change the file `path`, if they could.
pub fn unsafe_file(path: &Path) -> Option<String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Some("not readable".into());
    };
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if meta.uid() != 0 && meta.uid() != uid {
        return Some(format!("owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o002 != 0 {
        return Some(format!(
            "writable by every user (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    if meta.mode() & 0o020 != 0 && meta.gid() != 0 && meta.gid() != gid {
        return Some(format!("writable by group {}", meta.gid()));
    }
    None
}

/// Why another user could change what is in `dir`, if they could.
/// `watched`: the directory whose entries are watched (a sticky bit does
/// not make it safe: others could still add entries).
pub fn unsafe_dir(dir: &Path, watched: bool) -> Option<String> {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Some("not readable".into());
    };
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if meta.uid() != 0 && meta.uid() != uid {
        return Some(format!("owned by uid {}", meta.uid()));
    }
    let sticky_ancestor = !watched && meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o002 != 0 && !sticky_ancestor {
        return Some("writable by every user".into());
    }
    if meta.mode() & 0o020 != 0 && meta.gid() != 0 && meta.gid() != gid && !sticky_ancestor {
        return Some(format!("writable by group {}", meta.gid()));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_is_watched_through_its_directory_and_its_swapped_link() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("conf");
        std::fs::create_dir(&d).unwrap();
        std::fs::create_dir(d.join("..2026_01")).unwrap();
        std::fs::write(d.join("..2026_01/nginx.conf"), "x").unwrap();
        symlink("..2026_01", d.join("..data")).unwrap();
        symlink("..data/nginx.conf", d.join("nginx.conf")).unwrap();
        std::fs::write(d.join("plain.conf"), "x").unwrap();

        let f = Target::of(&d.join("nginx.conf")).unwrap();
        assert_eq!(f.dirs(), vec![(d.clone(), false)]);
        assert!(f.is_about(&d, Some(OsStr::new("nginx.conf"))));
        assert!(
            f.is_about(&d, Some(OsStr::new("..data"))),
            "the ConfigMap swap"
        );
        assert!(!f.is_about(&d, Some(OsStr::new("plain.conf"))));
        assert!(!f.is_about(&d, Some(OsStr::new("..data_tmp"))));
        assert!(!f.is_about(&d, None));

        let p = Target::of(&d.join("plain.conf")).unwrap();
        assert!(p.is_about(&d, Some(OsStr::new("plain.conf"))));
        assert!(!p.is_about(&d, Some(OsStr::new("..data"))));

        let dir = Target::of(&d).unwrap();
        assert_eq!(
            dir.dirs(),
            vec![(tmp.path().to_owned(), false), (d.clone(), true)]
        );
        assert!(dir.is_about(&d, Some(OsStr::new("anything"))));
        assert!(dir.is_about(&d.join("sub"), Some(OsStr::new("x"))));
        assert!(dir.is_about(&d, None), "the directory itself went");
        assert!(dir.is_about(tmp.path(), Some(OsStr::new("conf"))));
        assert!(!dir.is_about(tmp.path(), Some(OsStr::new("other"))));
    }

    #[test]
    fn paths_others_can_change_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("conf");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x.conf"), "x").unwrap();
        assert!(Target::of(&d.join("x.conf")).is_ok());
        chmod(&d, 0o777);
        let e = Target::of(&d.join("x.conf")).unwrap_err();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        // Sticky does not help the watched directory itself...
        chmod(&d, 0o1777);
        assert!(Target::of(&d.join("x.conf")).is_err());
        assert!(Target::of(&d).is_err());
        // ...but does above it (like /tmp).
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o755);
        assert!(Target::of(&sub).is_ok());
        // A symlink out of a safe directory into an unsafe one.
        chmod(&d, 0o777);
        let safe = tmp.path().join("safe");
        std::fs::create_dir(&safe).unwrap();
        symlink(d.join("x.conf"), safe.join("x.conf")).unwrap();
        assert!(Target::of(&safe.join("x.conf")).is_err());
        if nix::unistd::geteuid().is_root() {
            chmod(&d, 0o755);
            std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
            let e = Target::of(&d.join("x.conf")).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
        let e = Target::of(&tmp.path().join("missing.conf")).unwrap_err();
        assert!(e.to_string().contains("must exist"), "{e}");
    }
}
