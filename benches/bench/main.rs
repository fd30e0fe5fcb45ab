//! `make bench`: imaged measured against the limits of this machine, in the same run.
//!
//! For each image size and each of `--runs` runs, on a fresh private Mosquitto each time:
//! * **loadgen ceiling**: the load generator's images looped back to it by the broker, no daemon;
//! * **broker floor**: a forwarder that only republishes (no disk), see forwarder.rs;
//!
//! and then on each filesystem (fs.rs: the folder given, a loop-mounted journaled ext4 and xfs), alternating:
//! * **disk floor**: imaged's durable write sequence on 1, 4 and 16 threads, no MQTT, see disk.rs;
//! * **imaged**: the real release binary at log level info (its default) and warn, its files and republishes
//!   checked byte for byte;
//! * **original QoS 0 / QoS 1**: benches/original/mqtt_image_store_and_forward.py;
//! * imaged and the original at QoS 1 again with a small end-to-end window (`--small-window`, 100).
//!
//! It prints the medians and imaged's ratios to each limit, and writes them to target/bench/. A run where
//! imaged (or a limit that must not lose anything) loses or corrupts an image fails: exit status 1.
//! No timing is asserted. See docs/BENCHMARKS.md for what is measured and how.
//!
//! `cargo test --all-targets` runs this binary without arguments: it then does nothing.

mod broker;
#[path = "../../tests/common/mod.rs"]
mod common;
mod daemon;
mod disk;
mod forwarder;
mod fs;
mod load;
mod original;
mod payload;
mod procfs;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use crate::daemon::Imaged;
use crate::forwarder::{STORED, UPLOAD};
use crate::fs::{Fs, FsKind};
use crate::load::{LoadGen, Phase, PhaseResult, Stop};
use crate::original::Original;
use crate::payload::Gen;
use crate::procfs::CpuMeter;
use crate::report::{percentile, Measure};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Subject {
    Loop,
    Forwarder,
    Disk,
    Imaged,
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Acks {
    Auto,
    Manual,
}

/// imaged's benchmark: throughput, latency, CPU and memory against the broker, the disk and the original.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// A tiny run for CI: 10 KB only, 300 images, one run; still checks every image.
    #[arg(long)]
    smoke: bool,
    /// Image sizes (k = 1,000 bytes, m = 1,000,000) [default: 10k,100k,1m,5m]
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Option<Vec<usize>>,
    /// Runs per size; the tables show medians [default: 2]
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds of publishing in each loaded phase [default: 2]
    #[arg(long)]
    seconds: Option<f64>,
    /// Images per loaded phase instead of --seconds
    #[arg(long)]
    count: Option<u64>,
    /// Images in each unloaded (one at a time) phase [default: 200, 100 at 1 MB, 40 at 5 MB]
    #[arg(long)]
    unloaded: Option<u64>,
    /// Images published and not yet seen back [default: min(1024, 256 MiB / size)]
    #[arg(long)]
    window: Option<usize>,
    /// Measure only these [default: all]
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Option<Vec<Subject>>,
    /// How the broker-floor forwarder acknowledges uploads
    #[arg(long, value_enum, default_value = "auto")]
    forwarder_acks: Acks,
    /// imaged binary [default: target/release/imaged, built by cargo bench]
    #[arg(long)]
    imaged: Option<PathBuf>,
    /// Extra imaged config, e.g. `limits.inflight_images=512` (repeatable)
    #[arg(long = "imaged-set", value_name = "SECTION.KEY=VALUE")]
    imaged_set: Vec<String>,
    /// The original script [default: benches/original/mqtt_image_store_and_forward.py]
    #[arg(long)]
    original: Option<PathBuf>,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Folder on the disk under test for brokers, images and the disk floor, and where the loop-mounted
    /// filesystems' image files go [default: $TMPDIR or /tmp]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Filesystems measured: the folder given, and a journaled ext4 and an xfs in loop-mounted image files
    /// made for the run (root; skipped with a line otherwise) [default: dir,ext4,xfs; --smoke: dir]
    #[arg(long, value_delimiter = ',', value_enum)]
    fs: Option<Vec<FsKind>>,
    /// Size of each loop-mounted filesystem's (sparse) image file, GiB
    #[arg(long, default_value_t = 24)]
    fs_gib: u64,
    /// Writer threads of the disk floor, one measurement each [default: 1,4,16; --smoke: 4]
    #[arg(long, value_delimiter = ',')]
    disk_writers: Option<Vec<usize>>,
    /// imaged's log levels measured; the first is the one the targets are read at [default: info,warn;
    /// --smoke: info]
    #[arg(long, value_delimiter = ',')]
    levels: Option<Vec<String>>,
    /// A second end-to-end window for imaged (first log level) and the original at QoS 1; 0: none
    /// [default: 100; --smoke: 0]
    #[arg(long)]
    small_window: Option<usize>,
    /// Where the report goes [default: target/bench/report.md, and runs.tsv beside it]
    #[arg(long)]
    out: Option<PathBuf>,
    /// During imaged's loaded phases, run this shell command with {pid} replaced by imaged's PID, and stop it
    /// with SIGINT at the end of the phase (e.g. 'strace -c -f -p {pid} -o /tmp/strace.txt')
    #[arg(long, value_name = "COMMAND")]
    attach: Option<String>,
    /// The disk floor keeps each file in the page cache after its fsync, where imaged (and by default the
    /// disk floor) drops it (posix_fadvise DONTNEED)
    #[arg(long)]
    disk_keep_cache: bool,
    /// The disk floor writes a named temp file and renames it (imaged's sequence before O_TMPFILE, and where
    /// the filesystem has none), instead of an O_TMPFILE file that it links
    #[arg(long)]
    disk_named: bool,
    /// Keep the scratch folders (broker logs, imaged's log and images)
    #[arg(long)]
    keep: bool,
    /// Internal: run as the broker-floor forwarder on this port
    #[arg(long, hide = true)]
    forwarder: Option<u16>,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, unit) = match s.strip_suffix("kb").or_else(|| s.strip_suffix('k')) {
        Some(d) => (d, 1_000),
        None => match s.strip_suffix("mb").or_else(|| s.strip_suffix('m')) {
            Some(d) => (d, 1_000_000),
            None => (s.as_str(), 1),
        },
    };
    let n: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s}"))?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float to integer `as` saturates, and the size is the user's own"
    )]
    let size = (n * unit as f64) as usize;
    if size < 64 {
        return Err("sizes start at 64 bytes".into());
    }
    Ok(size)
}

/// What every measurement needs.
struct Ctx {
    args: Args,
    rt: Arc<tokio::runtime::Runtime>,
    base: PathBuf,
    imaged: PathBuf,
    original: PathBuf,
    original_ok: Result<(), String>,
    sets: Vec<(String, String, String)>,
    config: imaged::config::Config,
    me: PathBuf,
}

impl Ctx {
    fn wants(&self, s: Subject) -> bool {
        self.args.only.as_ref().is_none_or(|o| o.contains(&s))
    }

    fn loaded(&self, size: usize, window: Option<usize>) -> Phase {
        let window = window
            .or(self.args.window)
            .unwrap_or_else(|| ((256usize << 20) / size).clamp(8, 1024));
        let stop = match (self.args.count, self.args.smoke) {
            (Some(n), _) => Stop::Count(n),
            (None, true) => Stop::Count(300),
            (None, false) => Stop::After(Duration::from_secs_f64(self.args.seconds.unwrap_or(2.0))),
        };
        Phase {
            window,
            stop,
            stall: Duration::from_secs(20),
        }
    }

    fn unloaded(&self, size: usize) -> Phase {
        let n = self.args.unloaded.unwrap_or(if self.args.smoke {
            20
        } else if size >= 5_000_000 {
            40
        } else if size >= 1_000_000 {
            100
        } else {
            200
        });
        Phase {
            window: 1,
            stop: Stop::Count(n),
            stall: Duration::from_secs(20),
        }
    }

    fn small_window(&self) -> Option<usize> {
        Some(
            self.args
                .small_window
                .unwrap_or(if self.args.smoke { 0 } else { 100 }),
        )
        .filter(|&w| w > 0)
    }

    fn scratch(&self, base: &Path, what: &str) -> Result<tempfile::TempDir, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("imaged-bench-{what}-"))
            .tempdir_in(base)
            .map_err(|e| format!("cannot create a scratch folder in {}: {e}", base.display()))?;
        // Readable by the broker whatever user it runs as.
        let _ = std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        Ok(dir)
    }
}

/// A subject that takes images from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Loop,
    Forwarder,
    /// At this log level.
    Imaged(String),
    Original(u8),
}

impl Kind {
    fn label(&self) -> String {
        match self {
            Kind::Loop => report::LOOP.into(),
            Kind::Forwarder => report::BROKER.into(),
            Kind::Imaged(level) if level == "info" => report::IMAGED.into(),
            Kind::Imaged(level) if level == "warn" => report::IMAGED_WARN.into(),
            Kind::Imaged(level) => format!("{}, log level {level}", report::IMAGED),
            Kind::Original(0) => report::ORIG0.into(),
            Kind::Original(_) => report::ORIG1.into(),
        }
    }
}

/// One MQTT measurement: what, on which filesystem (none for those that touch no disk), at which window.
struct Mqtt<'a> {
    kind: Kind,
    fs: Option<&'a Fs>,
    window: Option<usize>,
}

/// What runs during one measurement, killed (by PID, through the guards) when it ends.
enum Running {
    None,
    Forwarder(Child),
    Imaged(Box<Imaged>),
    Original(Original),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::None => None,
            Running::Forwarder(c) => Some(c.id()),
            Running::Imaged(d) => d.pid(),
            Running::Original(o) => Some(o.pid()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Forwarder(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn per_k(seconds: Option<f64>, images: u64) -> Option<f64> {
    seconds
        .filter(|_| images > 0)
        .map(|s| s / images as f64 * 1000.0)
}

fn fill_latencies(m: &mut Measure, r: &PhaseResult) {
    m.p50 = percentile(&r.latencies_ms, 0.50);
    m.p99 = percentile(&r.latencies_ms, 0.99);
}

fn measure_mqtt(ctx: &Ctx, gen: &Gen, what: &Mqtt, run: usize) -> Measure {
    let label = what.kind.label();
    let mut m = Measure {
        fs: what.fs.map(|f| f.label.clone()).unwrap_or_default(),
        subject: match what.window {
            Some(w) => report::at_window(&label, w),
            None => label,
        },
        size: gen.size(),
        run,
        ..Measure::default()
    };
    if let Err(e) = measure_mqtt_into(ctx, gen, what, &mut m) {
        m.failure = Some(e);
    }
    m
}

/// Latency one image at a time; every image must come back.
fn unloaded_phase(ctx: &Ctx, lg: &LoadGen, gen: &Gen, m: &mut Measure) -> Result<(), String> {
    let u = lg.run(ctx.unloaded(gen.size()));
    m.u50 = percentile(&u.latencies_ms, 0.50);
    m.u99 = percentile(&u.latencies_ms, 0.99);
    if let Some(f) = u.failure {
        return Err(format!("unloaded phase: {f}"));
    }
    if u.lost() > 0 {
        return Err(format!(
            "unloaded phase: {} of {} images never came back",
            u.lost(),
            u.sent
        ));
    }
    Ok(())
}

/// Starts what is measured, on the broker at `port`.
fn start_subject(ctx: &Ctx, kind: &Kind, port: u16, scratch: &Path) -> Result<Running, String> {
    Ok(match kind {
        Kind::Loop => Running::None,
        Kind::Forwarder => {
            let acks = match ctx.args.forwarder_acks {
                Acks::Auto => "auto",
                Acks::Manual => "manual",
            };
            let child = Command::new(&ctx.me)
                .args(["--forwarder", &port.to_string(), "--forwarder-acks", acks])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start the forwarder: {e}"))?;
            Running::Forwarder(child)
        }
        Kind::Imaged(level) => Running::Imaged(Box::new(Imaged::start(
            &ctx.imaged,
            &scratch.join("imaged"),
            port,
            level,
            &ctx.sets,
        )?)),
        Kind::Original(qos) => Running::Original(Original::start(
            &ctx.args.python,
            &ctx.original,
            port,
            scratch,
            *qos,
        )?),
    })
}

/// What the subject left behind: imaged's files and warnings, the original's survivors.
fn check_subject(
    running: &mut Running,
    gen: &Gen,
    r: &PhaseResult,
    sent: u64,
    m: &mut Measure,
    problems: &mut Vec<String>,
) {
    match running {
        Running::Imaged(d) => {
            if let Err(e) = d.stop() {
                problems.push(e);
            }
            let files = daemon::check_files(&d.images, gen, sent);
            if !files.ok() {
                problems.push(format!(
                    "files: {} of {} sent images missing, {} corrupt",
                    files.missing, sent, files.corrupt
                ));
            }
            if files.duplicates > 0 {
                m.notes
                    .push(format!("{} images stored twice", files.duplicates));
            }
            let warnings = d.warnings();
            if warnings > 0 {
                m.notes
                    .push(format!("{warnings} log lines at warn or above"));
            }
        }
        Running::Original(o) => {
            let (_, intact) = o.survivors(gen);
            m.survived = Some((r.sent, intact));
        }
        _ => {}
    }
}

fn measure_mqtt_into(ctx: &Ctx, gen: &Gen, what: &Mqtt, m: &mut Measure) -> Result<(), String> {
    let kind = &what.kind;
    let scratch = ctx.scratch(
        what.fs.map_or(ctx.base.as_path(), |f| f.dir.as_path()),
        &kind.label().replace([' ', ','], "-"),
    )?;
    let broker = broker::start();
    let port = broker.port;
    let mut running = start_subject(ctx, kind, port, scratch.path())?;
    let pid = running.pid();
    let sub_topic = if *kind == Kind::Loop { UPLOAD } else { STORED };
    let lg = LoadGen::connect(&ctx.rt, port, UPLOAD, sub_topic, gen.clone())?;
    let is_imaged = matches!(kind, Kind::Imaged(_));
    if !is_imaged && !lg.probe(Duration::from_secs(30)) {
        return Err(format!("{} passed no probe image on in 30s", kind.label()));
    }
    if let (true, Some(pid)) = (is_imaged, pid) {
        std::thread::sleep(Duration::from_millis(500));
        m.idle_rss_kib = procfs::rss_kib(pid);
    }
    // The original's losses are a finding about it, not a failure of the bench.
    let must_not_lose = !matches!(kind, Kind::Original(_));
    if must_not_lose {
        unloaded_phase(ctx, &lg, gen, m)?;
    }
    if let Some(pid) = pid {
        procfs::reset_peak_rss(pid);
    }
    let attached = match (is_imaged, &ctx.args.attach, pid) {
        (true, Some(cmd), Some(pid)) => Some(attach(cmd, pid)?),
        _ => None,
    };
    let me = std::process::id();
    let meter = CpuMeter::start(&[pid, Some(broker.pid()), Some(me)]);
    let started = Instant::now();
    let r = lg.run(ctx.loaded(gen.size(), what.window));
    let wall = started.elapsed();
    let cpu = meter.stop();
    if let Some(child) = attached {
        detach(child);
    }
    m.peak_rss_kib = pid.and_then(procfs::peak_rss_kib);
    m.images = r.received;
    m.rate = r.rate();
    m.lost = r.lost();
    fill_latencies(m, &r);
    m.cpu_k = per_k(cpu.seconds[0], r.received);
    m.broker_cpu_k = per_k(cpu.seconds[1], r.received);
    m.harness_cpu_k = per_k(cpu.seconds[2], r.received);
    m.busy = cpu.machine_busy;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ours: f64 = cpu.seconds.iter().flatten().sum();
    m.others = cpu
        .machine_busy
        .map(|b| (b - ours / (wall.as_secs_f64() * cores)).max(0.0));
    let totals = lg.totals(Duration::from_millis(300));
    m.duplicates = totals.duplicates;
    if let (true, Some(pid)) = (is_imaged, pid) {
        std::thread::sleep(Duration::from_secs(1));
        m.after_rss_kib = procfs::rss_kib(pid);
    }
    let mut problems = Vec::new();
    if let Some(f) = &r.failure {
        problems.push(f.clone());
    }
    if totals.corrupt > 0 {
        problems.push(format!(
            "{} republished payloads differ from what was sent",
            totals.corrupt
        ));
    }
    if r.lost() > 0 {
        let lost = format!("{} of {} images never came back", r.lost(), r.sent);
        if must_not_lose {
            problems.push(lost);
        } else {
            m.notes.push(lost);
        }
    }
    if totals.foreign > 0 {
        m.notes.push(format!("{} unknown payloads", totals.foreign));
    }
    for e in &totals.errors {
        m.notes.push(format!("client error: {e}"));
    }
    check_subject(&mut running, gen, &r, totals.sent, m, &mut problems);
    if broker.log().contains("dropped") {
        m.notes.push("the broker dropped messages".into());
    }
    lg.close();
    drop(running);
    let broker_log = broker.log();
    drop(broker);
    if ctx.args.keep {
        let _ = std::fs::write(scratch.path().join("mosquitto.log"), broker_log);
    }
    done_with(ctx, scratch, what.fs);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Keeps a scratch folder (--keep) or removes it and trims its filesystem.
fn done_with(ctx: &Ctx, scratch: tempfile::TempDir, fs: Option<&Fs>) {
    if ctx.args.keep {
        eprintln!("    kept {}", scratch.keep().display());
    } else {
        drop(scratch);
        if let Some(fs) = fs {
            fs.trim();
        }
    }
}

/// Starts a profiler against imaged (through sh, {pid} replaced).
fn attach(cmd: &str, pid: u32) -> Result<Child, String> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {}", cmd.replace("{pid}", &pid.to_string())))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("--attach: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

fn detach(mut child: Child) {
    // SAFETY: kill(2) on our own child's PID, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let _ = child.wait();
}

/// The disk floor on `fs` with `writers` threads. With one writer, every write waits for the one before: its
/// latency is the unloaded one.
fn measure_disk(ctx: &Ctx, gen: &Gen, run: usize, fs: &Fs, writers: usize) -> Measure {
    let mut m = Measure {
        fs: fs.label.clone(),
        subject: report::disk_label(writers),
        size: gen.size(),
        run,
        ..Measure::default()
    };
    let result = (|| -> Result<(), String> {
        let scratch = ctx.scratch(&fs.dir, "disk")?;
        let sequence = disk::Sequence {
            dontneed: !ctx.args.disk_keep_cache,
            named: ctx.args.disk_named,
        };
        let me = std::process::id();
        let meter = CpuMeter::start(&[Some(me)]);
        let started = Instant::now();
        let r = disk::run(
            scratch.path(),
            gen,
            writers,
            ctx.loaded(gen.size(), None).stop,
            sequence,
        )?;
        let wall = started.elapsed();
        let cpu = meter.stop();
        m.images = r.images;
        m.rate = r.rate();
        m.p50 = percentile(&r.latencies_ms, 0.50);
        m.p99 = percentile(&r.latencies_ms, 0.99);
        if writers == 1 {
            (m.u50, m.u99) = (m.p50, m.p99);
        }
        m.harness_cpu_k = per_k(cpu.seconds[0], r.images);
        m.busy = cpu.machine_busy;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        m.others = cpu
            .machine_busy
            .map(|b| (b - cpu.seconds[0].unwrap_or(0.0) / (wall.as_secs_f64() * cores)).max(0.0));
        if !sequence.dontneed {
            m.notes.push("page cache kept".into());
        }
        if sequence.named {
            m.notes.push("named temp file and rename".into());
        }
        done_with(ctx, scratch, Some(fs));
        Ok(())
    })();
    if let Err(e) = result {
        m.failure = Some(e);
    }
    m
}

fn progress(m: &Measure) {
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    eprintln!(
        "  {:<16} {:>9.1} images/s  p50 {} p99 {} ms  unloaded p50 {} ms  cpu/1000 {}  peak RSS {} KiB{}{}",
        m.subject,
        m.rate,
        f(m.p50),
        f(m.p99),
        f(m.u50),
        f(m.cpu_k),
        m.peak_rss_kib.map_or("–".into(), |k| k.to_string()),
        m.survived
            .map_or(String::new(), |(n, s)| format!("  survived {s} of {n}")),
        m.failure
            .as_ref()
            .map_or(String::new(), |f| format!("  FAILED: {f}")),
    );
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn output_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s += &String::from_utf8_lossy(&o.stderr);
            s
        })
        .unwrap_or_default()
}

/// The machine, the software and the settings, for the report's head.
fn describe(ctx: &Ctx, filesystems: &[Fs], skipped: &[String]) -> String {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let df = output_of(
        "df",
        &[
            "-h",
            "--output=source,fstype,size,avail",
            &ctx.base.display().to_string(),
        ],
    );
    let df = df
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let mosq = output_of("mosquitto", &["-h"]);
    let mosq = mosq.lines().next().unwrap_or("").trim().to_string();
    let py = output_of(
        &ctx.args.python,
        &[
            "-c",
            "import sys, paho.mqtt as m; print(sys.version.split()[0], 'paho-mqtt', m.__version__)",
        ],
    );
    let manifest = env!("CARGO_MANIFEST_DIR");
    let rev = output_of("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]);
    let dirty = !output_of(
        "git",
        &[
            "-C",
            manifest,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "src",
        ],
    )
    .trim()
    .is_empty();
    let load = read("/proc/loadavg");
    let c = &ctx.config;
    format!(
        "- machine: {cores} × {model}, {mem} RAM, kernel {kernel}\n\
         - disk of the folder given: {} ({df})\n\
         - filesystems: {}{}\n\
         - {mosq}; Python {}\n\
         - imaged {} at {}{}; config: defaults (log level as the rows say): storage.writers {}, limits.inflight_images {}, \
           limits.inflight_bytes {}, storage.max_image_bytes {}{}\n\
         - load average at start: {}\n",
        ctx.base.display(),
        filesystems
            .iter()
            .map(|f| f.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        skipped
            .iter()
            .map(|s| format!("; {s}"))
            .collect::<String>(),
        py.trim(),
        env!("CARGO_PKG_VERSION"),
        rev.trim(),
        if dirty { " (with uncommitted changes in src/)" } else { "" },
        c.storage.writers,
        c.limits.inflight_images,
        c.limits.inflight_bytes,
        c.storage.max_image_bytes,
        if ctx.sets.is_empty() {
            String::new()
        } else {
            format!(
                "; set: {}",
                ctx.sets
                    .iter()
                    .map(|(s, k, v)| format!("{s}.{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        load.trim()
    )
}

fn target_dir(me: &Path) -> PathBuf {
    // target/<profile>/deps/bench-HASH
    me.parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn main() -> ExitCode {
    if std::env::args_os().len() == 1 {
        // `cargo test --all-targets` runs bench targets without arguments.
        println!("bench: nothing to do without arguments; run `make bench` or `make bench-smoke`");
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    if let Some(port) = args.forwarder {
        return forwarder::run(port, args.forwarder_acks == Acks::Manual);
    }
    match bench(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--imaged-set section.key=value`, as (section, key, value).
fn parse_sets(given: &[String]) -> Result<Vec<(String, String, String)>, String> {
    let mut sets = Vec::new();
    for s in given {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("--imaged-set {s}: expected section.key=value"))?;
        let (section, key) = key
            .split_once('.')
            .ok_or_else(|| format!("--imaged-set {s}: expected section.key=value"))?;
        sets.push((
            section.trim().to_string(),
            key.trim().to_string(),
            value.trim().to_string(),
        ));
    }
    Ok(sets)
}

/// Every subject asked for, at every size, `runs` times; the disk-touching ones on each filesystem in turn.
fn measure_all(ctx: &Ctx, filesystems: &[Fs], sizes: &[usize], runs: usize) -> Vec<Measure> {
    let smoke = ctx.args.smoke;
    let disk_writers = ctx.args.disk_writers.clone().unwrap_or(if smoke {
        vec![ctx.config.storage.writers]
    } else {
        vec![1, 4, 16]
    });
    let levels = ctx.args.levels.clone().unwrap_or(if smoke {
        vec!["info".into()]
    } else {
        vec!["info".into(), "warn".into()]
    });
    let original = ctx.wants(Subject::Original) && ctx.original_ok.is_ok();
    let mut measures = Vec::new();
    let mut record = |m: Measure| {
        progress(&m);
        measures.push(m);
    };
    for &size in sizes {
        for run in 1..=runs {
            let gen = Gen::new(size);
            let loaded = ctx.loaded(size, None);
            eprintln!(
                "{} run {run}/{runs} (window {}, {:?}):",
                report::size_label(size),
                loaded.window,
                loaded.stop
            );
            let nodisk = |kind| Mqtt {
                kind,
                fs: None,
                window: None,
            };
            if ctx.wants(Subject::Loop) {
                record(measure_mqtt(ctx, &gen, &nodisk(Kind::Loop), run));
            }
            if ctx.wants(Subject::Forwarder) {
                record(measure_mqtt(ctx, &gen, &nodisk(Kind::Forwarder), run));
            }
            for fs in filesystems {
                eprintln!(" on {}:", fs.label);
                if ctx.wants(Subject::Disk) {
                    for &w in &disk_writers {
                        record(measure_disk(ctx, &gen, run, fs, w));
                    }
                }
                let mut kinds = Vec::new();
                // imaged and the original alternate, so that what else runs on the machine hits both alike.
                for (i, level) in levels.iter().enumerate() {
                    if ctx.wants(Subject::Imaged) {
                        kinds.push((Kind::Imaged(level.clone()), None));
                    }
                    if original && i < 2 {
                        kinds.push((Kind::Original(if i == 0 { 1 } else { 0 }), None));
                    }
                }
                if let (Some(w), Some(level)) = (ctx.small_window(), levels.first()) {
                    if ctx.wants(Subject::Imaged) {
                        kinds.push((Kind::Imaged(level.clone()), Some(w)));
                    }
                    if original {
                        kinds.push((Kind::Original(1), Some(w)));
                    }
                }
                for (kind, window) in kinds {
                    let what = Mqtt {
                        kind,
                        fs: Some(fs),
                        window,
                    };
                    record(measure_mqtt(ctx, &gen, &what, run));
                }
            }
        }
    }
    measures
}

/// The report, and the measurements that failed.
fn report_text(
    ctx: &Ctx,
    head: &str,
    sizes: &[usize],
    runs: usize,
    measures: &[Measure],
    started: Instant,
) -> (String, Vec<String>) {
    let summaries = report::summarize(measures);
    let mut order: Vec<report::Key> = Vec::new();
    for m in measures {
        let key = (m.fs.clone(), m.size, m.subject.clone());
        if !order.contains(&key) {
            order.push(key);
        }
    }
    let mut bounds = BTreeMap::new();
    let mut bound_text = String::from(
        "Memory bound (README, \"Memory\"): RSS <= 2 x limits.inflight_bytes + 10 x storage.max_image_bytes + 32 MiB",
    );
    for &size in sizes {
        let (documented, at_size) = daemon::memory_bound(&ctx.config, size);
        bounds.insert(size, documented / 1024);
        bound_text += &format!(
            "; {}: {:.0} MiB (with the image size in place of max_image_bytes: {:.0} MiB)",
            report::size_label(size),
            documented as f64 / (1 << 20) as f64,
            at_size as f64 / (1 << 20) as f64
        );
    }
    bound_text += ".\n";
    let failures: Vec<String> = measures
        .iter()
        .filter_map(|m| {
            m.failure.as_ref().map(|f| {
                format!(
                    "{} {} {} run {}: {f}",
                    report::size_label(m.size),
                    m.fs,
                    m.subject,
                    m.run
                )
            })
        })
        .collect();
    let mut text = format!(
        "# imaged benchmark\n\n{head}- {} run(s) per size, medians; {:.0} s in all; load average at the end: {}\n\n",
        runs,
        started.elapsed().as_secs_f64(),
        read("/proc/loadavg").trim()
    );
    if let (true, Err(e)) = (ctx.wants(Subject::Original), &ctx.original_ok) {
        text += &format!("The original was not measured: {e}.\n\n");
    }
    text += "## Figures\n\n";
    text += &report::figures_table(sizes, &order, &summaries);
    text += "\n## imaged against the limits\n\n";
    text += &report::targets_table(sizes, &order, &summaries, &bounds, ctx.small_window());
    text += "\n";
    text += &bound_text;
    if !failures.is_empty() {
        text += "\n## FAILED\n\n";
        for f in &failures {
            text += &format!("- {f}\n");
        }
    }
    (text, failures)
}

/// The filesystems asked for, and a line for each that cannot be had.
fn filesystems(ctx: &Ctx) -> (Vec<Fs>, Vec<String>) {
    let kinds = ctx.args.fs.clone().unwrap_or(if ctx.args.smoke {
        vec![FsKind::Dir]
    } else {
        vec![FsKind::Dir, FsKind::Ext4, FsKind::Xfs]
    });
    let needs_disk =
        ctx.wants(Subject::Disk) || ctx.wants(Subject::Imaged) || ctx.wants(Subject::Original);
    let mut filesystems = Vec::new();
    let mut skipped = Vec::new();
    for kind in kinds.iter().filter(|_| needs_disk) {
        match Fs::make(*kind, &ctx.base, ctx.args.fs_gib) {
            Ok(fs) => filesystems.push(fs),
            Err(e) => {
                eprintln!("{e}");
                skipped.push(e);
            }
        }
    }
    (filesystems, skipped)
}

fn bench(args: Args) -> Result<bool, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let imaged = args
        .imaged
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_imaged")));
    let original = args.original.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/original/mqtt_image_store_and_forward.py")
    });
    let original_ok = original::available(&args.python, &original);
    let sets = parse_sets(&args.imaged_set)?;
    // The effective config imaged runs with (its defaults plus ours), for the writers and the memory bound.
    let probe_dir = tempfile::tempdir_in(&base).map_err(|e| e.to_string())?;
    let probe_path = probe_dir.path().join("imaged.toml");
    std::fs::write(
        &probe_path,
        daemon::config_text(1, probe_dir.path(), "info", &sets),
    )
    .map_err(|e| e.to_string())?;
    let config =
        imaged::config::Config::load(&probe_path).map_err(|e| format!("bench config: {e}"))?;
    drop(probe_dir);
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?,
    );
    let sizes = match (&args.sizes, args.smoke) {
        (Some(s), _) => s.clone(),
        (None, true) => vec![10_000],
        (None, false) => vec![10_000, 100_000, 1_000_000, 5_000_000],
    };
    let runs = args.runs.unwrap_or(if args.smoke { 1 } else { 2 });
    let ctx = Ctx {
        rt,
        base,
        imaged,
        original,
        original_ok,
        sets,
        config,
        me,
        args,
    };
    if !ctx.imaged.exists() {
        return Err(format!(
            "{} is missing: run cargo build --release",
            ctx.imaged.display()
        ));
    }
    // A private copy: a rebuild of target/release/imaged during the run must not change what is measured.
    let bin_dir = ctx.scratch(&ctx.base, "bin")?;
    let private = bin_dir.path().join("imaged");
    std::fs::copy(&ctx.imaged, &private)
        .map_err(|e| format!("cannot copy {}: {e}", ctx.imaged.display()))?;
    let mut ctx = ctx;
    ctx.imaged = private;
    let (filesystems, skipped) = filesystems(&ctx);
    let head = describe(&ctx, &filesystems, &skipped);
    eprintln!("{head}");
    if let (true, Err(e)) = (ctx.wants(Subject::Original), &ctx.original_ok) {
        eprintln!("original: SKIP: {e}");
    }
    let started = Instant::now();
    let measures = measure_all(&ctx, &filesystems, &sizes, runs);
    let (text, failures) = report_text(&ctx, &head, &sizes, runs, &measures, started);
    println!("{text}");
    let out = ctx
        .args
        .out
        .clone()
        .unwrap_or_else(|| target_dir(&ctx.me).join("bench").join("report.md"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tsv = out.with_extension("tsv");
    match std::fs::write(&out, &text)
        .and_then(|()| std::fs::write(&tsv, report::runs_tsv(&measures)))
    {
        Ok(()) => eprintln!("report: {} and {}", out.display(), tsv.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
    if failures.is_empty() {
        eprintln!("bench: every image stored and republished intact");
        Ok(true)
    } else {
        eprintln!(
            "bench: FAILED: {} measurement(s) lost or corrupted images",
            failures.len()
        );
        Ok(false)
    }
}
