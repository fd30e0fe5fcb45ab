//! Power cuts under imaged (issue 14): imaged stores onto the power-cut filesystem (tests/powercut), which
//! keeps only what was fsynced; it is killed -9 and the power is cut at random moments, then imaged starts
//! again on what survived. Clean means: every image the broker acknowledged to the sender is stored whole
//! exactly once and was republished, and no `.jpg` is partial.
//!
//! It needs root, /dev/fuse and the powercut-fs binary (`cargo build -p powercut-fs`; `make test` builds it
//! first). `POWERCUT_CUTS` sets the number of cuts (20), `POWERCUT_SEED` the random moments (14).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::load::{publish_all, Ledger};
use common::powercut::{usable, Power};
use common::scenarios::{confirmed_republishes, images, settle, STORED, UPLOAD};
use common::{Broker, Daemon, Observer};

/// What the state folder held after a cut, for the report.
fn state_folder(backing: &Path) -> String {
    let dir = backing.join(".imaged");
    let Ok(entries) = fs::read_dir(&dir) else {
        return ".imaged MISSING".into();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!("{} ({len} B)", e.file_name().to_string_lossy())
        })
        .collect();
    names.sort();
    if !names.iter().any(|n| n.starts_with("index.log ")) {
        names.push("index.log MISSING".into());
    }
    format!(".imaged: {}", names.join(", "))
}

fn jpgs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jpg"))
                .count()
        })
        .unwrap_or(0)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_acknowledged_image_is_stored_once_and_republished_across_power_cuts_at_random_moments() {
    let Some(bin) = usable() else { return };
    let cuts = usize::try_from(env_number("POWERCUT_CUTS", 20)).unwrap_or(usize::MAX);
    let seed = env_number("POWERCUT_SEED", 14);
    let mut rng = fastrand::Rng::with_seed(seed);

    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    // The mount is the storage folder itself (so the state folder, <dir>/.imaged, is on it too), where the
    // harness looks for stored images.
    let mut daemon = Daemon::prepare(broker.port, "", &[]);
    let backing = daemon.dir.join("backing");
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&daemon.images).unwrap();
    let mut power = Power::on(&bin, &backing, &daemon.images);
    daemon.spawn();
    daemon.wait_ready();

    // A batch per cut, published while imaged runs, so the cut lands while it works through the batch (or,
    // after a longer pause, once it is idle again). Batches of very different sizes: a large backlog is what
    // makes imaged hold many acknowledged uploads whose republish is not confirmed yet.
    let sizes: Vec<usize> = (0..cuts).map(|_| rng.usize(20..=400)).collect();
    let imgs = images(seed, sizes.iter().sum(), 1_000, 30_000);
    let mut acked = Vec::new();
    let mut history = Vec::new();
    let mut rest = &imgs[..];
    for (cut, size) in sizes.iter().enumerate() {
        let cut = cut + 1;
        let (batch, later) = rest.split_at(*size);
        rest = later;
        let publisher = {
            let (port, batch) = (broker.port, batch.to_vec());
            std::thread::spawn(move || {
                publish_all(port, UPLOAD, &batch, 32, Duration::from_secs(120))
            })
        };
        std::thread::sleep(Duration::from_millis(rng.u64(20..=400)));
        daemon.kill9();
        let report = power.cut_and_reboot();
        history.push(format!(
            "cut {cut:2}: {}, {} .jpg kept; {}",
            state_folder(&backing),
            jpgs(&backing),
            report.trim_start_matches("powercut-fs: power cut: ")
        ));
        // The broker acknowledges the sender whether imaged runs or not.
        acked.extend(publisher.join().unwrap());
        daemon.spawn();
        daemon.wait_ready_n(cut + 1);
    }
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);

    // And once more at rest: what imaged reported stored must survive a cut too.
    daemon.kill9();
    let report = power.cut_and_reboot();
    history.push(format!(
        "final cut: {}, {} .jpg kept; {}",
        state_folder(&backing),
        jpgs(&backing),
        report.trim_start_matches("powercut-fs: power cut: ")
    ));
    let at_rest = Ledger::count(
        &imgs,
        &acked,
        &daemon.images,
        &observer.seen(),
        &confirmed_republishes(&daemon),
    );
    println!("{}", history.join("\n"));
    for (when, l) in [("under cuts", &ledger), ("after the final cut", &at_rest)] {
        let count = |what: &str| l.lost.iter().filter(|s| s.ends_with(what)).count();
        println!(
            "{when}: sent {}, acked {}, stored {}; acknowledged but not stored {}, stored but never republished \
             {}, duplicated {}, partial {}",
            l.sent,
            l.acked,
            l.stored,
            count("acknowledged, not stored"),
            count("stored, never republished"),
            l.duplicated,
            l.partial
        );
    }
    let subscription = fs::read_to_string(backing.join(".imaged/subscription")).ok();
    drop(power);
    ledger.assert_clean("imaged under power cuts");
    at_rest.assert_clean("imaged's stored images after a final power cut");
    // What imaged remembers of its subscription (to unsubscribe a filter that topics.upload no longer has).
    assert_eq!(
        subscription.as_deref(),
        Some(UPLOAD),
        ".imaged/subscription survives a power cut"
    );
}
