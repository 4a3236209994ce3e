//! The differential oracle with a fixed seed and budget: generated workspaces and changes, every
//! build plain and through ferry, nothing may differ. `cargo xtask difftest` runs it longer.

use ferry_tests::{World, bin, oracle};

/// Seed and budget CI runs (about two minutes on two cores; `cargo xtask difftest` runs longer).
const SEED: u64 = 20261207;
const SEQUENCES: usize = 8;
const STEPS: usize = 10;

#[test]
fn plain_and_ferry_builds_never_differ() {
    let world = World::new();
    let opts = oracle::Options {
        seed: SEED,
        sequences: SEQUENCES,
        steps: STEPS,
        ferry: bin("ferry"),
        work: world.path().join("oracle"),
        shrink: false,
        shrink_runs: 0,
        cluster: true,
        only: None,
    };
    let mut lines = Vec::new();
    let report = oracle::run(&opts, &mut |l| {
        eprintln!("oracle: {l}");
        lines.push(l.to_owned())
    });
    assert_eq!(report.sequences, SEQUENCES);
    assert!(report.builds >= SEQUENCES * STEPS, "{lines:#?}");
    assert!(report.hits > 0, "the builds never hit: {lines:#?}");
    if let Some(f) = report.findings.first() {
        panic!("{}\n{}\n--- script:\n{}", lines.join("\n"), f.message, f.script);
    }
}
