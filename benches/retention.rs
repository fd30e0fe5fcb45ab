//! `make bench-retention`: imaged started on a store of 1,000,000 prepared images (sparse files in one
//! folder, as the default `storage.path` leaves them, their catalog and an index of the newest 100,000),
//! with `retention.max_size` set so that the first pass must delete the oldest 1,000. Prints how long
//! start-up took to READY, and what the pass cost: the catalog bytes it read and its time. The CI version is
//! `start_up_on_50000_stored_images_is_ready_within_2s_and_a_pass_deleting_1000_reads_nothing_else` in
//! tests/retention.rs, which asserts the same at 50,000.
//!
//! Options: `--images N` (default 1000000). Needs about 1M free inodes and a few minutes, most of them to
//! make and remove the files.

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args
        .iter()
        .position(|a| a == "--images")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (ready, read, elapsed_ms) = common::store::start_on_a_prepared_store(n);
    println!(
        "{n} stored images: READY after {} ms; the first pass deleted 1,000 in {elapsed_ms} ms, reading {read} bytes of catalog",
        ready.as_millis()
    );
    assert!(
        ready < std::time::Duration::from_secs(2),
        "start-up over 2 s: {ready:?}"
    );
}
