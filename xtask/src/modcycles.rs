//! `cargo xtask modcycles`: fails when top-level modules of the `reloader`
//! crate import each other in a circle. Edges are the `crate::MODULE`
//! paths in each module's files (also inside `use crate::{a, b::c}`
//! groups); inline `#[cfg(test)] mod tests { … }` blocks are left out.
//! Cycles are the strongly connected components of more than one module
//! (Tarjan).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context, Result, bail};

/// Module → the modules it refers to.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

pub fn check(src: &Path) -> Result<()> {
    let graph = graph(src)?;
    let cycles = cycles(&graph);
    if cycles.is_empty() {
        println!("modcycles: no cycles among {} modules", graph.len());
        return Ok(());
    }
    let text: Vec<String> = cycles.iter().map(|c| c.join(" <-> ")).collect();
    bail!(
        "modules of the reloader crate import each other in a circle: {}. Move the shared type \
         down to a module both can use.",
        text.join("; ")
    )
}

/// The module graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> Result<Graph> {
    let mut graph = Graph::new();
    for entry in walk(src)? {
        let rel = entry.strip_prefix(src)?;
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .context("file name")?;
        let top = top.strip_suffix(".rs").unwrap_or(top).to_owned();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&entry)?;
        let deps = references(&text);
        graph
            .entry(top.clone())
            .or_default()
            .extend(deps.into_iter().filter(|d| *d != top));
    }
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| names.contains(d));
    }
    Ok(graph)
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(files)
}

/// The top-level modules `text` refers to through `crate::`.
pub fn references(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut deps = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, d::{e}}`: the first segment of each
            // top-level item of the group.
            let mut depth = 0;
            let mut items = vec![String::new()];
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(String::new()),
                    _ => {}
                }
                if depth == 0 && c != ',' {
                    items.last_mut().expect("one item").push(c);
                }
            }
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    deps.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            {
                deps.insert(name);
            }
        }
    }
    deps
}

/// Strongly connected components with more than one module.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_read_from_paths_and_use_groups() {
        let text = "use crate::{config::RunConfig, state::{Handle, X}, error};\n\
                    fn f() { crate::steering::load(); let _ = crate::Foo; }\n\
                    #[cfg(test)]\nmod tests {\n use crate::demo::x;\n}\n";
        let found: Vec<String> = references(text).into_iter().collect();
        assert_eq!(found, vec!["config", "error", "state", "steering"]);
    }

    #[test]
    fn a_circle_is_found_and_a_dag_is_not() {
        let mut g = Graph::new();
        g.insert("a".into(), ["b".to_owned()].into());
        g.insert("b".into(), ["c".to_owned()].into());
        g.insert("c".into(), BTreeSet::new());
        assert!(cycles(&g).is_empty());
        g.get_mut("c").unwrap().insert("a".into());
        assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    }
}
