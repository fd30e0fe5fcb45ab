//! `make torture`: the fault scenarios of tests/faults.rs at scale, until at least 1,000 faults have been
//! injected over at least 100,000 images (or the time budget runs out), then the table for
//! docs/RELIABILITY.md. Exits non-zero when any image was lost, duplicated or partial.
//!
//! Options: `--faults N` (default 1000), `--images N` (default 100000), `--minutes N` (default 50),
//! `--only imaged|broker|network|disk|sigstop|hostile` (one kind, no memory flood), `--round N` (start with
//! round N's seeds, to run one again).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::scenarios::{self, Run};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One round of every scenario `--only` allows, with seeds from `seed`.
fn round(seed: u64, only: Option<&str>) -> Vec<Run> {
    let wanted = |kind: &str| only.is_none_or(|o| o == kind);
    let mut runs = Vec::new();
    if wanted("imaged") {
        runs.push(scenarios::imaged_kills(seed + 1, 8000, 150));
    }
    if wanted("broker") {
        runs.push(scenarios::broker_kills(seed + 2, 3000, 30));
    }
    if wanted("network") {
        runs.push(scenarios::network_faults(seed + 3, 4000, 15));
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

/// Hostile payloads are counted in their own row, not toward the fault target: the target is met by kills,
/// cuts, stalls, full disks and stops alone. Returns (faults, images).
fn totals(runs: &[Run]) -> (usize, usize) {
    let faults = runs
        .iter()
        .filter(|r| r.kind != "hostile input")
        .map(|r| r.faults)
        .sum::<usize>();
    (faults, runs.iter().map(|r| r.ledger.sent).sum::<usize>())
}

fn main() {
    let want_faults = usize::try_from(arg("--faults", 1000)).unwrap_or(usize::MAX);
    let want_images = usize::try_from(arg("--images", 100_000)).unwrap_or(usize::MAX);
    let budget = Duration::from_secs(arg("--minutes", 50) * 60);
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let start = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    // `--round N` starts at round N: its seeds, so that one round can be run again.
    let mut round = arg("--round", 1) - 1;
    println!(
        "torture: until {want_faults} faults over {want_images} images, at most {} min",
        budget.as_secs() / 60
    );
    while start.elapsed() < budget {
        let (faults, images) = totals(&runs);
        if faults >= want_faults && images >= want_images {
            break;
        }
        round += 1;
        let round_runs = self::round(1000 * round, only.as_deref());
        print_round(round, &round_runs);
        runs.extend(round_runs);
        let (faults, images) = totals(&runs);
        println!(
            "after round {round}: {faults} faults, {images} images, {:.1} min",
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
    let (faults, images) = totals(&runs);
    println!();
    println!("{}", scenarios::table(&runs));
    println!(
        "memory flood: peak RSS {:.1} MiB, documented bound {:.1} MiB, RSS after each round (MiB): {:?}",
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        after_round.iter().map(|r| (*r as f64 / 104857.6).round() / 10.0).collect::<Vec<_>>()
    );
    println!(
        "{faults} faults (besides the hostile payloads) over {images} images in {:.1} min ({round} rounds)",
        start.elapsed().as_secs_f64() / 60.0
    );
    let bad = runs
        .iter()
        .any(|r| !r.ledger.lost.is_empty() || r.ledger.duplicated > 0 || r.ledger.partial > 0);
    let short = faults < want_faults || images < want_images;
    if short {
        println!("NOT ENOUGH: the time budget ran out before {want_faults} faults over {want_images} images");
    }
    if peak > bound {
        println!("MEMORY: peak RSS over the documented bound");
    }
    if bad || short || peak > bound {
        std::process::exit(1);
    }
}
