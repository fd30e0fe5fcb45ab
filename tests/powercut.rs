//! Power cuts under imaged (issue 14): imaged stores onto the power-cut filesystem (tests/powercut), which
//! keeps only what was fsynced; it is killed -9 and the power is cut at random moments, then imaged starts
//! again on what survived. Clean means: every image the broker acknowledged to the sender is stored whole
//! exactly once and was republished, and no `.jpg` is partial.
//!
//! It needs root, /dev/fuse and the powercut-fs binary (`cargo build -p powercut-fs`; `make test` builds it
//! first). `POWERCUT_CUTS` sets the number of cuts (20), `POWERCUT_SEED` the random moments (14).

mod common;

use common::scenarios::{power_cuts, UPLOAD};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_acknowledged_image_is_stored_once_and_republished_across_power_cuts_at_random_moments() {
    let cuts = usize::try_from(env_number("POWERCUT_CUTS", 20)).unwrap_or(usize::MAX);
    let seed = env_number("POWERCUT_SEED", 14);
    let Some(found) = power_cuts(seed, cuts) else {
        return;
    };
    println!("{}", found.history.join("\n"));
    for (when, l) in [
        ("under cuts", &found.run.ledger),
        ("after the final cut", &found.at_rest),
    ] {
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
    found.run.ledger.assert_clean("imaged under power cuts");
    found
        .at_rest
        .assert_clean("imaged's stored images after a final power cut");
    // What imaged remembers of its subscription (to unsubscribe a filter that topics.upload no longer has).
    assert_eq!(
        found.subscription.as_deref(),
        Some(UPLOAD),
        ".imaged/subscription survives a power cut"
    );
}
