//! `make torture`: the fault scenarios of tests/faults.rs and tests/powercut.rs at scale, until at least 1,000
//! faults and 200 power cuts have been injected over at least 100,000 images (or the time budget runs out),
//! then the table for docs/RELIABILITY.md. Exits non-zero when any image was lost, duplicated or partial.
//!
//! Options: `--faults N` (default 1000), `--cuts N` (default 200; none without root and /dev/fuse),
//! `--images N` (default 100000), `--minutes N` (default 50),
//! `--only imaged|broker|network|disk|sigstop|hostile|powercut` (one kind, no memory flood), `--round N`
//! (start with round N's seeds, to run one again).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::scenarios::{self, Mqtt, Run};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether power cuts can be made here (the filesystem says why not).
fn can_cut() -> bool {
    common::powercut::usable().is_some()
}

/// One round of every scenario `--only` allows, with seeds from `seed`.
fn round(seed: u64, only: Option<&str>) -> Vec<Run> {
    let wanted = |kind: &str| only.is_none_or(|o| o == kind);
    let mut runs = Vec::new();
    if wanted("imaged") {
        runs.push(scenarios::imaged_kills(seed + 1, 8000, 150, Mqtt::V311));
    }
    if wanted("broker") {
        runs.push(scenarios::broker_kills(seed + 2, 3000, 30, Mqtt::V311));
    }
    if wanted("network") {
        runs.push(scenarios::network_faults(seed + 3, 4000, 15, Mqtt::V311));
    }
    if wanted("disk") && scenarios::can_mount() {
        runs.push(scenarios::disk_faults(seed + 4, 4000, 15));
    }
    if wanted("sigstop") {
        runs.push(scenarios::sigstops(seed + 5, 3000, 8));
    }
    if wanted("hostile") {
        runs.push(scenarios::hostile_input(seed + 6, 2000, 1000));
    }
    if wanted("powercut") {
        if let Some(found) = scenarios::power_cuts(seed + 7, 40) {
            let mut run = found.run;
            // What the last cut, at rest, found missing counts as lost too.
            run.ledger.lost.extend(
                found
                    .at_rest
                    .lost
                    .iter()
                    .map(|l| format!("after the final cut: {l}")),
            );
            run.ledger.duplicated += found.at_rest.duplicated;
            run.ledger.partial += found.at_rest.partial;
            runs.push(run);
        }
    }
    runs
}

fn print_round(round: u64, runs: &[Run]) {
    for run in runs {
        let l = &run.ledger;
        println!(
            "round {round}: {:<28} faults {:>4}  sent {:>6}  acked {:>6}  stored {:>6}  lost {}  duplicated {}  partial {}",
            run.kind,
            run.faults,
            l.sent,
            l.acked,
            l.stored,
            l.lost.len(),
            l.duplicated,
            l.partial
        );
        for lost in l.lost.iter().take(5) {
            println!("    LOST {lost}");
        }
    }
}

/// Hostile payloads are counted in their own row, not toward the fault target, and so are power cuts, which
/// have a target of their own: the fault target is met by kills, network cuts, stalls, full disks and stops
/// alone. Returns (faults, images, power cuts).
fn totals(runs: &[Run]) -> (usize, usize, usize) {
    let count = |kind: &str| -> usize {
        runs.iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.faults)
            .sum()
    };
    let all: usize = runs.iter().map(|r| r.faults).sum();
    let cuts = count("power cut");
    (
        all - count("hostile input") - cuts,
        runs.iter().map(|r| r.ledger.sent).sum::<usize>(),
        cuts,
    )
}

fn main() {
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let want_faults = usize::try_from(arg("--faults", 1000)).unwrap_or(usize::MAX);
    let want_images = usize::try_from(arg("--images", 100_000)).unwrap_or(usize::MAX);
    // Power cuts need the power-cut filesystem (root, /dev/fuse): without it the round has none.
    let want_cuts = if only.as_deref().is_none_or(|o| o == "powercut") && can_cut() {
        usize::try_from(arg("--cuts", 200)).unwrap_or(usize::MAX)
    } else {
        0
    };
    let budget = Duration::from_secs(arg("--minutes", 50) * 60);
    let start = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    // `--round N` starts at round N: its seeds, so that one round can be run again.
    let mut round = arg("--round", 1) - 1;
    println!(
        "torture: until {want_faults} faults over {want_images} images, at most {} min",
        budget.as_secs() / 60
    );
    while start.elapsed() < budget {
        let (faults, images, cuts) = totals(&runs);
        if faults >= want_faults && images >= want_images && cuts >= want_cuts {
            break;
        }
        round += 1;
        let round_runs = self::round(1000 * round, only.as_deref());
        print_round(round, &round_runs);
        runs.extend(round_runs);
        let (faults, images, cuts) = totals(&runs);
        println!(
            "after round {round}: {faults} faults, {cuts} power cuts, {images} images, {:.1} min",
            start.elapsed().as_secs_f64() / 60.0
        );
    }
    let (flood, peak, bound, after_round) = if only.is_some() {
        (None, 0, 0, Vec::new())
    } else {
        let (run, peak, bound, after) = scenarios::memory_flood(99, 10, 20);
        (Some(run), peak, bound, after)
    };
    runs.extend(flood);
    let (faults, images, cuts) = totals(&runs);
    println!();
    println!("{}", scenarios::table(&runs));
    println!(
        "memory flood: peak RSS {:.1} MiB, documented bound {:.1} MiB, RSS after each round (MiB): {:?}",
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        after_round.iter().map(|r| (*r as f64 / 104857.6).round() / 10.0).collect::<Vec<_>>()
    );
    println!(
        "{faults} faults (besides the hostile payloads and {cuts} power cuts) over {images} images in {:.1} min ({round} rounds)",
        start.elapsed().as_secs_f64() / 60.0
    );
    let bad = runs
        .iter()
        .any(|r| !r.ledger.lost.is_empty() || r.ledger.duplicated > 0 || r.ledger.partial > 0);
    let short = faults < want_faults || images < want_images || cuts < want_cuts;
    if short {
        println!("NOT ENOUGH: the time budget ran out before {want_faults} faults and {want_cuts} power cuts over {want_images} images");
    }
    if peak > bound {
        println!("MEMORY: peak RSS over the documented bound");
    }
    if bad || short || peak > bound {
        std::process::exit(1);
    }
}
