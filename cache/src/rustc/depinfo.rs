//! Reading rustc's dep-info (`.d`) files: the source files a compile read (modules, `include!`,
//! `include_str!`, `include_bytes!`, files under `OUT_DIR`) and the environment variables it read
//! through `env!`/`option_env!` (`# env-dep:` lines).

/// What one compile read, as listed in its dep-info.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DepInfo {
    /// Input files, as rustc wrote them (relative to the compile's cwd, or absolute), deduplicated
    /// and sorted.
    pub files: Vec<String>,
    /// Names of environment variables read, sorted.
    pub env: Vec<String>,
}

/// Parses a dep-info file. The outputs' own rules (`out: in1 in2`) list the inputs; the empty
/// `in1:` rules repeat them; `# env-dep:NAME[=value]` lines name variables.
///
/// Returns `None` unless the file is complete: it ends with a newline and every listed input also
/// has its own empty rule (rustc writes those after all output rules, so a file cut short — read
/// while another process rewrote it — fails this check instead of yielding a shorter input list).
pub fn parse(text: &str) -> Option<DepInfo> {
    if !text.ends_with('\n') {
        return None;
    }
    let mut info = DepInfo::default();
    let mut outputs = Vec::new();
    let mut empty_rules = Vec::new();
    for line in text.lines() {
        if let Some(env) = line.strip_prefix("# env-dep:") {
            let name = env.split_once('=').map_or(env, |(n, _)| n);
            info.env.push(unescape(name));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some(colon) = find_rule_colon(line) else { continue };
        let target = unescape(line[..colon].trim());
        let deps = split_escaped(&line[colon + 1..]);
        if deps.is_empty() {
            empty_rules.push(target);
        } else {
            outputs.push(target);
            info.files.extend(deps);
        }
    }
    info.files.retain(|f| !outputs.contains(f));
    info.files.sort();
    info.files.dedup();
    empty_rules.sort();
    empty_rules.dedup();
    if outputs.is_empty() || info.files != empty_rules {
        return None;
    }
    info.env.sort();
    info.env.dedup();
    Some(info)
}

/// The `# env-dep:` lines with the value the compile saw (`None`: the variable was unset).
pub fn env_values(text: &str) -> Vec<(String, Option<String>)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# env-dep:"))
        .map(|dep| match dep.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(unescape_env(value))),
            None => (dep.to_owned(), None),
        })
        .collect()
}

/// The names of the variables a dep-info file lists (`# env-dep:` lines), whatever their values.
pub fn env_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# env-dep:"))
        .map(|dep| dep.split_once('=').map_or(dep, |(name, _)| name).to_owned())
        .collect()
}

/// Undoes rustc's escaping of env-dep values (`\\` for a backslash, `\n` for a newline).
fn unescape_env(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The colon that ends a rule target: the first `: ` or a trailing `:` not escaped.
fn find_rule_colon(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b':' if i + 1 == bytes.len() || bytes[i + 1] == b' ' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn split_escaped(deps: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(' ') => cur.push(' '),
                Some(other) => {
                    cur.push('\\');
                    cur.push(other);
                }
                None => {}
            },
            ' ' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("\\ ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_style_dep_info() {
        let text = "/t/deps/foo-1.d: src/lib.rs src/a\\ b.rs /t/out/gen.rs x.txt\n\n\
                    /t/deps/libfoo-1.rmeta: src/lib.rs src/a\\ b.rs /t/out/gen.rs x.txt\n\n\
                    src/lib.rs:\nsrc/a\\ b.rs:\n/t/out/gen.rs:\nx.txt:\n\n\
                    # env-dep:CARGO_PKG_NAME=foo\n# env-dep:OUT_DIR=/t/out\n# env-dep:UNSET_ONE\n";
        let info = parse(text).unwrap();
        assert_eq!(info.files, ["/t/out/gen.rs", "src/a b.rs", "src/lib.rs", "x.txt"]);
        assert_eq!(info.env, ["CARGO_PKG_NAME", "OUT_DIR", "UNSET_ONE"]);
    }

    #[test]
    fn env_values_are_unescaped() {
        let text = "# env-dep:A=x\\ny\\\\z\n# env-dep:B\n# env-dep:C=\n";
        assert_eq!(
            env_values(text),
            [("A".into(), Some("x\ny\\z".into())), ("B".into(), None), ("C".into(), Some(String::new()))]
        );
    }

    #[test]
    fn incomplete_files_are_refused() {
        let text = "o.d: a.rs b.rs\n\na.rs:\nb.rs:\n";
        assert!(parse(text).is_some());
        for cut in 0..text.len() {
            assert!(parse(&text[..cut]).is_none(), "cut at {cut}: {:?}", &text[..cut]);
        }
        assert!(parse("o.d: a.rs b.rs\n\na.rs:\n").is_none());
    }
}
