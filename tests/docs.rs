//! The docs against the code: every configuration key that README.md and docs/DEPLOYMENT.md name
//! is one the config file accepts, every `TOKEN_SIDECAR_*` variable they name is read by the
//! code, every metric they name is registered, and every command block of README.md either runs
//! in CI (`.ci/run`) or says it is illustrative; and bench/ keeps what bench/README.md says of its
//! options (an unknown `--only` name fails, binaries come from `CARGO_TARGET_DIR`).

use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");
const DEPLOYMENT: &str = include_str!("../docs/DEPLOYMENT.md");
const CI: &str = include_str!("../.ci/run");

fn sources() -> String {
    let mut text = String::new();
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    text
}

/// Backticked words in the first cell of a table row.
fn first_cell_keys(row: &str) -> Vec<String> {
    let cell = row.trim_start_matches('|').split('|').next().unwrap_or("");
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every config key of the README's reference table, as a dotted path (`token.wait_timeout`,
/// `routes[].path_prefix`, `listen`).
fn readme_keys() -> BTreeSet<String> {
    let section = README
        .split("## Configuration reference")
        .nth(1)
        .expect("a Configuration reference section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(first_cell_keys)
        .collect()
}

/// Every key of DEPLOYMENT.md's per-table references, with its table as prefix.
fn deployment_keys() -> BTreeSet<String> {
    let reference = DEPLOYMENT
        .split("## Configuration reference")
        .nth(1)
        .expect("a Configuration reference section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut keys = BTreeSet::new();
    for table in reference.split("\n### ").skip(1) {
        let heading = table.lines().next().unwrap();
        let prefix = match heading.trim_matches('`') {
            "Top level" => String::new(),
            "[[routes]]" => "routes[].".to_owned(),
            // A table of a route: `[routes.inject]` documents `routes[].inject.*`.
            other if other.starts_with("[routes.") => {
                format!(
                    "routes[].{}.",
                    other.trim_matches(['[', ']']).trim_start_matches("routes.")
                )
            }
            other => format!("{}.", other.trim_matches(['[', ']'])),
        };
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            for key in first_cell_keys(row) {
                keys.insert(format!("{prefix}{key}"));
            }
        }
    }
    keys
}

/// Whether the config file accepts `key`: set to a value of the wrong type, the error is about
/// its type, never an unknown field.
fn accepted(key: &str) -> Result<(), String> {
    let toml = match key.split_once('.') {
        Some(("routes[]", rest)) => match rest.split_once('.') {
            Some((table, key)) => format!("[[routes]]\n[routes.{table}]\n{key} = {{ x = 1 }}\n"),
            None => format!("[[routes]]\n{rest} = {{ x = 1 }}\n"),
        },
        Some((table, rest)) => format!("[{table}]\n{rest} = {{ x = 1 }}\n"),
        None => format!("{key} = {{ x = 1 }}\n"),
    };
    let loaded = token_sidecar::config::Config::load(
        token_sidecar::config::Overrides {
            config: Some("docs.toml".into()),
            ..Default::default()
        },
        |_| None,
        |_| Ok(toml.clone()),
    );
    match loaded {
        Err(e) if e.to_string().contains("unknown field") => Err(e.to_string()),
        _ => Ok(()),
    }
}

#[test]
fn every_documented_config_key_exists() {
    let mut keys = readme_keys();
    keys.extend(deployment_keys());
    // `listen` / `admin` style cells name two keys; every name is checked on its own.
    assert!(keys.len() > 60, "the tables were found: {keys:?}");
    let missing: Vec<String> = keys
        .iter()
        .filter_map(|key| accepted(key).err().map(|e| format!("{key}: {e}")))
        .collect();
    assert!(
        missing.is_empty(),
        "documented keys the config rejects:\n{}",
        missing.join("\n")
    );
    // And the check can fail.
    assert!(accepted("token.no_such_key").is_err());
    assert!(accepted("no_such_key").is_err());
}

#[test]
fn every_documented_environment_variable_and_metric_exists() {
    let code = sources();
    let words = |text: &str, prefix: &str| -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
            .map(str::to_owned)
            .collect()
    };
    let docs = format!("{README}\n{DEPLOYMENT}");
    let variables = words(&docs, "TOKEN_SIDECAR_");
    assert!(variables.len() >= 10, "{variables:?}");
    for variable in &variables {
        assert!(
            code.contains(&format!("\"{variable}\"")),
            "{variable} is documented but never read"
        );
    }
    let metrics = words(&docs, "token_sidecar_");
    assert!(metrics.len() >= 14, "{metrics:?}");
    let registered = include_str!("../src/metrics.rs");
    for metric in &metrics {
        let family = metric.trim_start_matches("token_sidecar_");
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| family.strip_suffix(suffix))
            .unwrap_or(family);
        assert!(
            registered.contains(&format!("\"{family}\"")),
            "{metric} is documented but no family {family:?} is registered"
        );
    }
}

/// Whether CI runs `command`: some line of `.ci/run` (its `--locked` flags aside) starts with its
/// words. `.ci/run` itself is what CI runs.
fn run_in_ci(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    if words == ["bash", ".ci/run"] {
        return true;
    }
    CI.lines().any(|line| {
        let line: Vec<&str> = line
            .split_whitespace()
            .filter(|w| *w != "--locked")
            .collect();
        line.starts_with(&words)
    })
}

#[test]
fn every_readme_command_block_runs_in_ci_or_says_it_is_illustrative() {
    let mut blocks = 0;
    let mut previous = "";
    let mut lines = README.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("```sh") {
            blocks += 1;
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            if previous.starts_with("<!-- illustrative:") {
                continue;
            }
            assert!(
                previous.starts_with("<!-- runs in CI"),
                "README block {blocks} ({:?}) is neither marked <!-- runs in CI --> nor <!-- illustrative: why -->",
                body.first()
            );
            for command in body {
                let command = command.split(" #").next().unwrap().trim();
                if command.is_empty() || command.starts_with('#') {
                    continue;
                }
                assert!(
                    run_in_ci(command),
                    "README block {blocks}: {command:?} is not run by .ci/run"
                );
            }
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    assert!(blocks >= 4, "{blocks} blocks found");
    assert!(!run_in_ci("cargo frobnicate"), "the check can fail");
}

/// `python3 bench/bench.py ARGS` with `env`, as bench/run.sh would hand over: (exit code, stderr).
fn bench(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let done = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/bench.py"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("python3 runs");
    (
        done.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&done.stderr).into_owned(),
    )
}

#[test]
fn the_benchmarks_refuse_an_unknown_scenario_and_look_for_binaries_in_cargo_target_dir() {
    let (code, stderr) = bench(&["--only", "hit,nope"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("nope") && stderr.contains("fleet"),
        "{stderr}"
    );
    let missing = std::env::temp_dir().join(format!("no-target-{}", std::process::id()));
    let dir = missing.display().to_string();
    let (code, stderr) = bench(&["--only", "hit"], &[("CARGO_TARGET_DIR", &dir)]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("{dir}/release/token-sidecar is missing")),
        "{stderr}"
    );
}

/// docs/RELIABILITY.md counts the property tests: the count matches `tests/properties.rs`.
#[test]
fn reliability_md_counts_the_property_tests_there_are() {
    let doc = include_str!("../docs/RELIABILITY.md").replace('\n', " ");
    let properties = include_str!("properties.rs");
    let claim = doc
        .split("all ")
        .find_map(|rest| rest.split_once(" tests pass ("))
        .map(|(n, rest)| {
            (
                n.to_owned(),
                rest.split(')').next().unwrap_or("").to_owned(),
            )
        })
        .expect("RELIABILITY.md says how many property tests pass");
    let tests = properties.matches("#[test]").count();
    let regressions = properties.matches("/// regression test:").count();
    assert_eq!(claim.0, tests.to_string(), "{claim:?}");
    assert_eq!(
        claim.1,
        format!(
            "{} properties and {regressions} regression test{}",
            tests - regressions,
            if regressions == 1 { "" } else { "s" }
        ),
        "{claim:?}"
    );
}

/// README.md, docs/, every file under config/ and the Dockerfile, each as one line of prose:
/// comment markers and line breaks folded away.
fn prose_files() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = vec![root.join("README.md"), root.join("Dockerfile")];
    let mut dirs = vec![root.join("docs"), root.join("config")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| ["md", "toml", "yaml", "yml"].contains(&e.to_str().unwrap()))
            {
                paths.push(path);
            }
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let folded: Vec<&str> = text
                .lines()
                .map(|l| l.trim().trim_start_matches('#').trim())
                .collect();
            (path.display().to_string(), folded.join(" "))
        })
        .collect()
}

/// The drain keeps accepting until quiet (tests/operations.rs proves it), and the admin listener
/// serves four endpoints: every text that describes either says so.
#[test]
fn shutdown_and_the_admin_endpoints_are_described_alike_everywhere() {
    for (name, text) in prose_files() {
        for wrong in ["stop accepting", "stops accepting"] {
            assert!(!text.contains(wrong), "{name} says the drain {wrong:?}");
        }
        for (at, _) in text.match_indices("/healthz") {
            let window: String = text[at..].chars().take(60).collect();
            if window.contains("/metrics") {
                assert!(
                    window.contains("/status"),
                    "{name} lists the admin endpoints without /status: {window:?}"
                );
            }
        }
    }
}
