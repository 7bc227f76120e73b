//! The integration tests, as one test binary: each file of `tests/` is a module of this crate, so
//! `support` (the provider, the sidecar, the clients) compiles once and the tests link once.
//! `cargo test --test integration` runs them all, `cargo test --test integration token_path::`
//! one file's. A new test file needs its `mod` line here; the test below says so if it is missing.

mod support;

mod abuse;
mod connections;
mod demo;
mod docs;
mod faults;
mod fleet;
mod fleet_faults;
mod fleet_redis;
mod forwarding;
mod genesys_sdks;
mod inject;
mod operations;
mod properties;
mod routes;
mod smoke;
mod support_selftest;
mod token_path;
mod upstreams;

/// Cargo builds only this file (`autotests = false`): a test file without its `mod` line above
/// would never be compiled, let alone run.
#[test]
fn every_test_file_is_a_module_of_this_binary() {
    let this = include_str!("integration.rs");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && stem != "integration" {
            let line = format!("mod {stem};");
            assert!(
                this.lines().any(|l| l == line),
                "tests/{stem}.rs is not a module of tests/integration.rs"
            );
        }
    }
}
