//! `cargo xtask links`: every relative link in README.md, BENCHMARKS.md and
//! docs/*.md must name a file that exists, and its `#anchor` a heading of
//! that file, slugged as GitHub does (lowercase; letters, digits, `-` and
//! `_` kept, spaces made `-`, everything else dropped; a repeated slug gets
//! `-1`, `-2`, …). Links to other sites are not fetched. Text in fenced code
//! blocks and code spans is neither a link nor a heading.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// The documents whose links are checked, relative to the workspace root.
pub fn documents(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let docs = root.join("docs");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&docs)
        .with_context(|| format!("failed to list {}", docs.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("failed to list {}", docs.display()))?;
    pages.retain(|p| p.extension().is_some_and(|e| e == "md"));
    pages.sort();
    files.extend(pages);
    Ok(files)
}

pub fn check(root: &Path) -> Result<()> {
    let files = documents(root)?;
    let mut broken = Vec::new();
    let mut links = 0;
    for file in &files {
        let found = broken_links(root, file)?;
        links += found.checked;
        broken.extend(found.broken);
    }
    if broken.is_empty() {
        println!(
            "links: {links} relative links in {} files resolve",
            files.len()
        );
        return Ok(());
    }
    for b in &broken {
        eprintln!("{b}");
    }
    bail!(
        "{} broken relative links: fix the path, or the anchor to a heading of the target \
         (GitHub's slug: lowercase, punctuation dropped, spaces as `-`)",
        broken.len()
    )
}

pub struct Found {
    pub checked: usize,
    pub broken: Vec<String>,
}

/// Checks the relative links of `file`; `root` names files in messages.
pub fn broken_links(root: &Path, file: &Path) -> Result<Found> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read {}", file.display()))?;
    let name = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let dir = file.parent().unwrap_or(root);
    let mut found = Found {
        checked: 0,
        broken: Vec::new(),
    };
    for (line, target) in links(&text) {
        if is_external(&target) {
            continue;
        }
        found.checked += 1;
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let path = percent_decode(path);
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else if let Some(from_root) = path.strip_prefix('/') {
            root.join(from_root)
        } else {
            dir.join(&path)
        };
        if !resolved.exists() {
            found
                .broken
                .push(format!("{name}:{line}: {target}: no such file"));
            continue;
        }
        let Some(anchor) = anchor else { continue };
        if resolved.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let target_text = std::fs::read_to_string(&resolved)
            .with_context(|| format!("failed to read {}", resolved.display()))?;
        if !anchors(&target_text).contains(anchor) {
            found.broken.push(format!(
                "{name}:{line}: {target}: no heading with anchor #{anchor} in {}",
                resolved.strip_prefix(root).unwrap_or(&resolved).display()
            ));
        }
    }
    Ok(found)
}

fn is_external(target: &str) -> bool {
    let scheme = target.split_once(':').map(|(s, _)| s);
    scheme.is_some_and(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The lines of `text` outside fenced code blocks, with their numbers.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence: Option<(char, usize)> = None;
    text.lines().enumerate().filter_map(move |(i, line)| {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        if let Some(c) = marker {
            let run = trimmed.chars().take_while(|x| *x == c).count();
            if run >= 3 {
                match fence {
                    None => fence = Some((c, run)),
                    Some((open, len)) if open == c && run >= len => fence = None,
                    Some(_) => {}
                }
                return None;
            }
        }
        fence.is_none().then_some((i + 1, line))
    })
}

/// `line` without its code spans (`` `…` ``), which hold no links.
fn without_code(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|c| *c == '`').count();
        let after = &rest[start + ticks..];
        let close = "`".repeat(ticks);
        match after.find(&close) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                out.push_str(&rest[start..]);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every link target in `text` with its line: inline links and images
/// (`[text](target "title")`) and reference definitions (`[label]: target`).
pub fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (number, line) in prose(text) {
        let line = without_code(line);
        if let Some(definition) = line.trim_start().strip_prefix('[')
            && let Some((_, rest)) = definition.split_once("]:")
            && let Some(target) = rest.split_whitespace().next()
        {
            out.push((number, target.trim_matches(['<', '>']).to_owned()));
            continue;
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let mut depth = 0usize;
            let mut end = after.len();
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = i;
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let inside = after[..end].trim();
            let target = match inside.strip_prefix('<') {
                Some(angled) => angled.split('>').next().unwrap_or(""),
                None => inside.split_whitespace().next().unwrap_or(""),
            };
            if !target.is_empty() {
                out.push((number, target.to_owned()));
            }
            rest = &after[end.min(after.len())..];
        }
    }
    out
}

/// The anchors GitHub gives the headings of `text`.
pub fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in prose(text) {
        let trimmed = line.trim_start();
        let hashes = trimmed.chars().take_while(|c| *c == '#').count();
        if line.len() - trimmed.len() > 3 || !(1..=6).contains(&hashes) {
            continue;
        }
        let rest = &trimmed[hashes..];
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            continue;
        }
        let base = slug(rest.trim().trim_end_matches('#').trim_end());
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// GitHub's slug of a heading's text: links reduced to their text, then
/// lowercase, letters, digits, `-` and `_` kept, spaces as `-`.
pub fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](target)` renders as `text`.
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_github() {
        assert_eq!(slug("UDP: DNS and HTTP/3"), "udp-dns-and-http3");
        assert_eq!(slug("`reloader status`"), "reloader-status");
        assert_eq!(
            slug("Servers that do not set `SO_REUSEPORT`: `--inject-reuseport`"),
            "servers-that-do-not-set-so_reuseport---inject-reuseport"
        );
        assert_eq!(
            slug("Keep-alive connections: `cargo xtask bench --keepalive`"),
            "keep-alive-connections-cargo-xtask-bench---keepalive"
        );
        assert_eq!(
            slug("Probes: `/healthz` and `/readyz`"),
            "probes-healthz-and-readyz"
        );
        assert_eq!(
            slug("Select-only steering on 5.10"),
            "select-only-steering-on-510"
        );
        assert_eq!(slug("See [the docs](x.md) ≥ 5"), "see-the-docs--5");
    }

    #[test]
    fn repeated_headings_are_numbered_and_code_is_not_a_heading() {
        let text = "# A\n\n## A\n\n```sh\n# comment\n```\n\n## A\n";
        let got: Vec<_> = anchors(text).into_iter().collect();
        assert_eq!(got, ["a", "a-1", "a-2"]);
    }

    #[test]
    fn links_outside_code_are_found() {
        let text = "see [a](a.md#x) and `[no](n.md)`, ![img](i.svg \"t\")\n\
                    ```\n[no](in-fence.md)\n```\n[ref]: r.md\n[p](f(1).md)\n";
        let got: Vec<_> = links(text).into_iter().map(|(_, t)| t).collect();
        assert_eq!(got, ["a.md#x", "i.svg", "r.md", "f(1).md"]);
    }

    /// What CI relies on: a good set of pages passes, and each kind of
    /// broken link fails with its file and line.
    #[test]
    fn the_check_passes_good_links_and_fails_broken_ones() {
        let root = tempfile::tempdir().expect("tempdir");
        let write = |path: &str, text: &str| {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write(
            "README.md",
            "# r\n\n## Install\n\nSee [usage](docs/use.md#the-flags-run) and \
             [install](#install), <https://example.com>, [site](https://x.y/#z).\n",
        );
        write("BENCHMARKS.md", "# b\n\n[back](README.md)\n");
        write(
            "docs/use.md",
            "# Use\n\n## The flags: `run`\n\n[up](../README.md#install), \
             [bench](../BENCHMARKS.md), [unit](../contrib/x.service)\n",
        );
        write("contrib/x.service", "");
        check(root.path()).expect("every link resolves");

        write(
            "docs/bad.md",
            "# Bad\n\n[gone](gone.md)\n[anchor](use.md#the-flags)\n[self](#nope)\n",
        );
        let found = broken_links(root.path(), &root.path().join("docs/bad.md")).expect("read");
        assert_eq!(found.checked, 3);
        assert_eq!(
            found.broken,
            [
                "docs/bad.md:3: gone.md: no such file",
                "docs/bad.md:4: use.md#the-flags: no heading with anchor #the-flags in docs/use.md",
                "docs/bad.md:5: #nope: no heading with anchor #nope in docs/bad.md",
            ]
        );
        let err = check(root.path()).expect_err("broken links fail the check");
        assert!(
            err.to_string().starts_with("3 broken relative links"),
            "{err}"
        );
    }

    /// This repository's own documents, as CI checks them.
    #[test]
    fn the_repository_documents_have_no_broken_links() {
        check(&crate::workspace_root()).expect("cargo xtask links");
    }
}
