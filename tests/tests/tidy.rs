//! The layout rules ARCHITECTURE.md ("Rules a test keeps") states, checked on the source tree:
//! 1. every crate forbids unsafe code: the workspace lint says so and every member opts in;
//! 2. a crate's top-level modules form no cycle: the `crate::` arrows between them run one way;
//! 3. wire types (`keyshare_proto`, `tonic`, `prost`, `envoy_types`) appear only in the adapter
//!    modules [`ADAPTERS`] lists and their submodules (`grpc/convert` is part of `grpc`);
//! 4. SQL appears only in store modules, and in the exceptions [`SQL_OUTSIDE_STORES`] lists;
//! 5. a SQLSTATE is read only where database failures are classified: store modules, each
//!    service's `error` (its one `From<DbError>`), and runtime's `db`.
//!
//! Comments and `#[cfg(test)]` modules are not read: tests may reach anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use keyshare_runtime::testkit::workspace_root;

/// The workspace's crates, by directory under `crates/` (every one of them: a test checks).
const CRATES: &[&str] = &["runtime", "proto", "identity", "keyring", "invitation", "authorizer", "testkit"];

/// Per crate, the modules (paths under `src/`, without `.rs`) that may name wire types: the
/// servers, the clients of other services, the error mapping and the wiring in `lib`/`main`.
/// A listed module's submodules are adapters too (keyring's `grpc/keys`, `grpc/convert`, …).
/// `proto` is the wire itself.
const ADAPTERS: &[(&str, &[&str])] = &[
    ("runtime", &["lib", "auth", "client", "error", "metrics", "server", "telemetry", "testkit", "tls", "wire"]),
    ("identity", &["lib", "main", "error", "grpc", "peers"]),
    ("keyring", &["lib", "main", "error", "grpc", "directory", "invitations"]),
    ("invitation", &["lib", "main", "error", "grpc", "peers"]),
    ("authorizer", &["lib", "main", "error", "grpc", "ext_authz", "usage_grpc", "follower", "stats/access"]),
    // The test kit starts services and calls them; only its typed settings stay off the wire.
    ("testkit", &["lib", "stack", "process", "authorization"]),
];

/// Modules outside a `store` that hold SQL, each with the reason ARCHITECTURE.md gives.
const SQL_OUTSIDE_STORES: &[(&str, &str)] = &[
    ("runtime/db", "the database layer itself: migrations, advisory locks, LISTEN"),
    ("runtime/mail", "the outbox is a store of its own, shared by every service that mails"),
    ("runtime/testkit", "it creates and drops the test databases"),
    ("keyring/feed", "the change feed's table, written under the advisory lock that makes sequence order commit order"),
];

/// Modules outside a `store` that open a transaction by hand rather than with `in_transaction!`,
/// each with the reason ARCHITECTURE.md gives.
const TRANSACTIONS_BY_HAND: &[(&str, &str)] = &[
    ("runtime/db", "in_transaction! itself"),
    ("keyring/feed", "the snapshot: one read-only REPEATABLE READ transaction, streamed as it is read"),
    ("invitation/app/calls", "it holds an invitation's call rows while it calls the peers, so its calls run in order"),
    (
        "keyring/invitations",
        "it holds a queued call's row while it makes the call, so replicas never make one together",
    ),
    (
        "identity/app/keyring_calls",
        "it holds a queued call's row while it makes the call, so replicas never make one together",
    ),
];

/// A source file's code without comments and without its `#[cfg(test)]` modules.
fn code(text: &str) -> Vec<(usize, String)> {
    let mut kept = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines.peek().is_some_and(|(_, next)| next.trim_start().starts_with("mod ") && next.contains('{'))
        {
            // Skip the module, braces counted.
            let mut depth = 0i32;
            for (_, line) in lines.by_ref() {
                depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
                if depth <= 0 && line.contains('}') {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find("// ") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        kept.push((number + 1, line.to_owned()));
    }
    kept
}

/// Every `.rs` file under `dir`, as (module path like `stats/access`, file).
fn modules(src: &Path) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let relative = file.strip_prefix(src).unwrap().with_extension("");
            let mut module = relative.to_string_lossy().replace('\\', "/");
            if let Some(parent) = module.strip_suffix("/mod") {
                module = parent.to_owned();
            }
            (module, file)
        })
        .collect()
}

/// The top-level modules named by `crate::…` paths in `line`.
fn crate_references(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        // `keyshare_crate::` or `$crate::` are not this crate.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != "self" {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// Whether `module` is one of `adapters` or a submodule of one (`grpc/convert` of `grpc`).
fn is_adapter(adapters: &[&str], module: &str) -> bool {
    adapters
        .iter()
        .any(|adapter| module == *adapter || module.strip_prefix(adapter).is_some_and(|rest| rest.starts_with('/')))
}

fn top(module: &str) -> &str {
    module.split('/').next().unwrap()
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, node: &'a str) {
        let next = s.index.len();
        s.index.insert(node, next);
        s.low.insert(node, next);
        s.stack.push(node);
        s.on_stack.insert(node);
        for to in s.graph.get(node).into_iter().flatten() {
            let to = to.as_str();
            if !s.index.contains_key(to) {
                visit(s, to);
                let low = s.low[node].min(s.low[to]);
                s.low.insert(node, low);
            } else if s.on_stack.contains(to) {
                let low = s.low[node].min(s.index[to]);
                s.low.insert(node, low);
            }
        }
        if s.low[node] == s.index[node] {
            let mut component = Vec::new();
            while let Some(member) = s.stack.pop() {
                s.on_stack.remove(member);
                component.push(member.to_owned());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}

fn is_sql(line: &str) -> bool {
    const STARTS: &[&str] = &[
        "SELECT ",
        "INSERT INTO ",
        "UPDATE ",
        "DELETE FROM ",
        "WITH ",
        "COPY ",
        "CREATE ",
        "ALTER ",
        "DROP ",
        "TRUNCATE ",
        "LOCK TABLE ",
        "LISTEN ",
        "NOTIFY ",
    ];
    line.match_indices('"').any(|(at, _)| {
        let literal = line[at + 1..].trim_start();
        STARTS.iter().any(|start| literal.starts_with(start))
    })
}

#[test]
fn every_crate_forbids_unsafe_code() {
    let root = workspace_root();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let lints = workspace.split("[workspace.lints.rust]").nth(1).expect("Cargo.toml has [workspace.lints.rust]");
    let lints = lints.split("\n[").next().unwrap();
    assert!(
        lints.lines().any(|l| l.replace(' ', "") == "unsafe_code=\"forbid\""),
        "[workspace.lints.rust] must say unsafe_code = \"forbid\""
    );
    let mut on_disk: Vec<String> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = CRATES.iter().map(|c| (*c).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "tests/tests/tidy.rs's CRATES must list every crate under crates/");
    let members = CRATES.iter().map(|c| format!("crates/{c}")).chain(["tests".to_owned()]);
    for member in members {
        let manifest = std::fs::read_to_string(root.join(&member).join("Cargo.toml")).unwrap();
        let opted_in = manifest.split("[lints]").nth(1).is_some_and(|rest| {
            rest.split("\n[").next().unwrap().lines().any(|l| l.replace(' ', "") == "workspace=true")
        });
        assert!(opted_in, "{member}/Cargo.toml must take the workspace lints ([lints] workspace = true)");
    }
}

#[test]
fn no_crate_has_a_module_cycle() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join("crates").join(krate).join("src");
        let files = modules(&src);
        let names: BTreeSet<&str> =
            files.iter().map(|(m, _)| top(m)).filter(|m| !["lib", "main"].contains(m)).collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut why: BTreeMap<(String, String), String> = BTreeMap::new();
        for (module, file) in &files {
            let from = top(module);
            if ["lib", "main"].contains(&from) {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap();
            for (number, line) in code(&text) {
                for to in crate_references(&line) {
                    if to != from && names.contains(to.as_str()) {
                        graph.entry(from.to_owned()).or_default().insert(to.clone());
                        why.entry((from.to_owned(), to)).or_insert_with(|| format!("src/{module}.rs:{number}"));
                    }
                }
            }
        }
        for cycle in cycles(&graph) {
            let arrows: Vec<String> = cycle
                .iter()
                .flat_map(|from| cycle.iter().map(move |to| (from, to)))
                .filter_map(|(from, to)| why.get(&(from.clone(), to.clone())).map(|at| format!("{from} → {to} ({at})")))
                .collect();
            problems.push(format!("crates/{krate}: modules {cycle:?} form a cycle: {}", arrows.join(", ")));
        }
    }
    assert!(problems.is_empty(), "module cycles:\n{}", problems.join("\n"));
}

#[test]
fn only_adapters_name_wire_types() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for (krate, adapters) in ADAPTERS {
        let src = root.join("crates").join(krate).join("src");
        for (module, file) in modules(&src) {
            if is_adapter(adapters, &module) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in code(&text) {
                if ["keyshare_proto", "tonic::", "tonic_", "prost::", "prost_types", "envoy_types"]
                    .iter()
                    .any(|wire| line.contains(wire))
                {
                    problems.push(format!("crates/{krate}/src/{module}.rs:{number}: {}", line.trim()));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "wire types outside the adapter modules (move the code to an adapter, or make the module one \
         in tests/tests/tidy.rs and ARCHITECTURE.md):\n{}",
        problems.join("\n")
    );
}

/// Every code line, outside the modules `allowed` lets through (crate, module), that `breaks`
/// the rule, as `crates/<crate>/src/<module>.rs:<line>: <code>`.
fn lines_breaking(allowed: impl Fn(&str, &str) -> bool, breaks: impl Fn(&str) -> bool) -> Vec<String> {
    let root = workspace_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join("crates").join(krate).join("src");
        for (module, file) in modules(&src) {
            if allowed(krate, &module) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in code(&text) {
                if breaks(&line) {
                    problems.push(format!("crates/{krate}/src/{module}.rs:{number}: {}", line.trim()));
                }
            }
        }
    }
    problems
}

#[test]
fn sql_lives_in_stores() {
    let problems = lines_breaking(
        |krate, module| {
            module.split('/').any(|part| part == "store")
                || SQL_OUTSIDE_STORES.iter().any(|(m, _)| *m == format!("{krate}/{module}"))
        },
        is_sql,
    );
    assert!(problems.is_empty(), "SQL outside the store modules:\n{}", problems.join("\n"));
}

/// Whether a line reads a SQLSTATE (directly, or through `DbError`'s readers of it).
fn reads_sql_state(line: &str) -> bool {
    ["SqlState", ".sql_state()", ".unique_violation()", ".code() == Some(&"].iter().any(|needle| line.contains(needle))
}

#[test]
fn sql_states_are_read_only_where_failures_are_classified() {
    let problems = lines_breaking(
        |krate, module| {
            module.split('/').any(|part| part == "store" || part == "error") || (krate == "runtime" && module == "db")
        },
        reads_sql_state,
    );
    assert!(
        problems.is_empty(),
        "a SQLSTATE read outside the stores and error mappings (a store should answer in its own type):\n{}",
        problems.join("\n")
    );
}

/// Whether a line opens a transaction itself.
fn opens_transaction(line: &str) -> bool {
    line.contains(".transaction()") || line.contains(".build_transaction()")
}

#[test]
fn transactions_are_opened_with_in_transaction() {
    let problems = lines_breaking(
        |krate, module| {
            module.split('/').any(|part| part == "store")
                || TRANSACTIONS_BY_HAND.iter().any(|(m, _)| *m == format!("{krate}/{module}"))
        },
        opens_transaction,
    );
    assert!(
        problems.is_empty(),
        "a transaction opened by hand (use keyshare_runtime::in_transaction!, which runs it again when \
         it loses a race; or list the module, with its reason, in tests/tests/tidy.rs and ARCHITECTURE.md):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checks_themselves_find_what_they_look_for() {
    // A rule that cannot fail is no rule: each detector on a line it must catch and one it must not.
    assert_eq!(crate_references("use crate::{check::Checker, model::Outcome};"), ["check", "model"]);
    assert_eq!(crate_references("let x = crate::usage::log_path(p); keyshare_crate::x();"), ["usage"]);
    assert!(is_sql(r#"        .query("SELECT id FROM t WHERE a = $1", &[&a])"#));
    assert!(is_sql(r#"            &format!("INSERT INTO {schema}.outbox (a) VALUES ($1)"),"#));
    assert!(!is_sql(r#"    let label = "Select a key";"#));
    assert!(reads_sql_state(
        r#"        .map_err(|e| if e.unique_violation().is_some() { Error::EmailTaken } else { e.into() })?;"#
    ));
    assert!(reads_sql_state("    if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) {"));
    assert!(!reads_sql_state("    store::update_key_text(&tx, key, &name, &description).await?.map_err(|_| taken)?;"));
    assert!(opens_transaction("        let tx = client.transaction().await?;"));
    assert!(opens_transaction("        .build_transaction()"));
    assert!(!opens_transaction("        in_transaction!(self.pool, |tx| -> Result<()> {"));
    assert!(is_adapter(&["grpc", "stats/access"], "grpc/convert"));
    assert!(is_adapter(&["grpc", "stats/access"], "stats/access"));
    assert!(!is_adapter(&["grpc", "stats/access"], "grpcx"));
    assert!(!is_adapter(&["grpc", "stats/access"], "stats/store"));
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
        ("d".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]
    .into();
    assert_eq!(cycles(&graph), [vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]);
    let kept = code("use a;\n// use crate::x;\n#[cfg(test)]\nmod tests {\n    use crate::y;\n}\nfn z() {}\n");
    let kept: Vec<&str> = kept.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(kept, ["use a;", "fn z() {}"]);
}
