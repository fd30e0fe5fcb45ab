//! Figures of one measurement, their medians over runs, and the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What one subject did in one run at one size.
#[derive(Debug, Clone, Default)]
pub struct Measure {
    /// The filesystem it ran on (empty for the loadgen ceiling and the broker floor, which touch no disk).
    pub fs: String,
    pub subject: String,
    pub size: usize,
    pub run: usize,
    /// Images that came back (or were written, for the disk floor) in the loaded phase.
    pub images: u64,
    pub rate: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub u50: Option<f64>,
    pub u99: Option<f64>,
    /// CPU seconds per 1,000 images: the subject's process, the broker, the harness.
    pub cpu_k: Option<f64>,
    pub broker_cpu_k: Option<f64>,
    pub harness_cpu_k: Option<f64>,
    /// Share of the machine busy during the loaded phase, and the share used by processes outside the bench.
    pub busy: Option<f64>,
    pub others: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub idle_rss_kib: Option<u64>,
    pub after_rss_kib: Option<u64>,
    /// The original: (files left, intact files).
    pub survived: Option<(u64, u64)>,
    pub lost: u64,
    pub duplicates: u64,
    pub failure: Option<String>,
    pub notes: Vec<String>,
}

pub const IMAGED: &str = "imaged";
pub const IMAGED_WARN: &str = "imaged, log level warn";
pub const LOOP: &str = "loadgen ceiling";
pub const BROKER: &str = "broker floor";
pub const DISK: &str = "disk floor";
pub const ORIG0: &str = "original QoS 0";
pub const ORIG1: &str = "original QoS 1";

/// A subject measured with another end-to-end window than the default one.
pub fn at_window(subject: &str, window: usize) -> String {
    format!("{subject}, window {window}")
}

pub fn disk_label(writers: usize) -> String {
    format!(
        "{DISK}, {writers} writer{}",
        if writers == 1 { "" } else { "s" }
    )
}

pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float to integer `as` saturates, and the rank is clamped to the list"
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The medians over runs of one subject at one size.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub runs: usize,
    pub rate: Option<f64>,
    pub rate_min: Option<f64>,
    pub rate_max: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub u50: Option<f64>,
    pub u99: Option<f64>,
    pub cpu_k: Option<f64>,
    pub broker_cpu_k: Option<f64>,
    pub harness_cpu_k: Option<f64>,
    pub busy: Option<f64>,
    pub others: Option<f64>,
    pub peak_rss_kib: Option<f64>,
    pub idle_rss_kib: Option<f64>,
    pub after_rss_kib: Option<f64>,
    pub survived: Option<f64>,
    pub images: Option<f64>,
    pub lost: u64,
    pub duplicates: u64,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

/// (filesystem, size, subject).
pub type Key = (String, usize, String);

pub fn summarize(measures: &[Measure]) -> BTreeMap<Key, Summary> {
    let mut groups: BTreeMap<Key, Vec<&Measure>> = BTreeMap::new();
    for m in measures {
        groups
            .entry((m.fs.clone(), m.size, m.subject.clone()))
            .or_default()
            .push(m);
    }
    groups
        .into_iter()
        .map(|(key, ms)| {
            let f = |get: &dyn Fn(&Measure) -> Option<f64>| {
                median(ms.iter().filter_map(|m| get(m)).collect())
            };
            let rates: Vec<f64> = ms.iter().map(|m| m.rate).collect();
            let mut notes: Vec<String> = ms.iter().flat_map(|m| m.notes.clone()).collect();
            notes.dedup();
            let s = Summary {
                runs: ms.len(),
                rate: median(rates.clone()),
                rate_min: rates.iter().copied().reduce(f64::min),
                rate_max: rates.iter().copied().reduce(f64::max),
                p50: f(&|m| m.p50),
                p99: f(&|m| m.p99),
                u50: f(&|m| m.u50),
                u99: f(&|m| m.u99),
                cpu_k: f(&|m| m.cpu_k),
                broker_cpu_k: f(&|m| m.broker_cpu_k),
                harness_cpu_k: f(&|m| m.harness_cpu_k),
                busy: f(&|m| m.busy),
                others: f(&|m| m.others),
                peak_rss_kib: f(&|m| m.peak_rss_kib.map(|v| v as f64)),
                idle_rss_kib: f(&|m| m.idle_rss_kib.map(|v| v as f64)),
                after_rss_kib: f(&|m| m.after_rss_kib.map(|v| v as f64)),
                survived: f(&|m| m.survived.map(|(_, intact)| intact as f64)),
                images: f(&|m| Some(m.images as f64)),
                lost: ms.iter().map(|m| m.lost).sum(),
                duplicates: ms.iter().map(|m| m.duplicates).sum(),
                failures: ms
                    .iter()
                    .filter_map(|m| m.failure.clone().map(|f| format!("run {}: {f}", m.run)))
                    .collect(),
                notes,
            };
            (key, s)
        })
        .collect()
}

pub fn size_label(size: usize) -> String {
    if size >= 1_000_000 && size % 1_000_000 == 0 {
        format!("{} MB", size / 1_000_000)
    } else if size >= 1_000 && size % 1_000 == 0 {
        format!("{} KB", size / 1_000)
    } else {
        format!("{size} B")
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "–".into(),
    }
}

fn rate(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "–".into(),
    }
}

fn mib(kib: Option<f64>) -> String {
    num(kib.map(|k| k / 1024.0), 1)
}

fn pct(v: Option<f64>) -> String {
    num(v.map(|v| v * 100.0), 0)
}

/// The table of every subject at every size, filesystem by filesystem, in the order they were measured.
pub fn figures_table(sizes: &[usize], order: &[Key], summaries: &BTreeMap<Key, Summary>) -> String {
    let mut out = String::new();
    out += "| size | filesystem | what | images/s (min–max) | MB/s | latency p50 / p99 ms | unloaded p50 / p99 ms | CPU s per 1000 | broker CPU s per 1000 | harness CPU s per 1000 | machine busy % (others) | peak RSS MiB | idle RSS MiB (after load) | notes |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for &size in sizes {
        for key in order.iter().filter(|k| k.1 == size) {
            let Some(s) = summaries.get(key) else {
                continue;
            };
            let (fs, _, subject) = key;
            let mbs = s.rate.map(|r| r * size as f64 / 1e6);
            let spread = match (s.rate_min, s.rate_max) {
                (Some(a), Some(b)) if s.runs > 1 => {
                    format!(" ({}–{})", rate(Some(a)), rate(Some(b)))
                }
                _ => String::new(),
            };
            let mut notes = s.notes.clone();
            if let Some(survived) = s.survived {
                notes.insert(
                    0,
                    format!(
                        "{survived:.0} of {:.0} files survived",
                        s.images.unwrap_or(0.0)
                    ),
                );
            }
            if s.lost > 0 {
                notes.push(format!("{} republishes lost in {} runs", s.lost, s.runs));
            }
            if s.duplicates > 0 {
                notes.push(format!("{} duplicate republishes", s.duplicates));
            }
            for f in &s.failures {
                notes.push(format!("FAILED {f}"));
            }
            let after = match s.after_rss_kib {
                Some(_) => format!("{} ({})", mib(s.idle_rss_kib), mib(s.after_rss_kib)),
                None => mib(s.idle_rss_kib),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {}{} | {} | {} / {} | {} / {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
                size_label(size),
                if fs.is_empty() { "(no disk)" } else { fs },
                subject,
                rate(s.rate),
                spread,
                num(mbs, 1),
                num(s.p50, 1),
                num(s.p99, 1),
                num(s.u50, 2),
                num(s.u99, 2),
                num(s.cpu_k, 3),
                num(s.broker_cpu_k, 3),
                num(s.harness_cpu_k, 3),
                pct(s.busy),
                pct(s.others),
                mib(s.peak_rss_kib),
                after,
                notes.join("; ")
            );
        }
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => " met",
        Some(false) => " MISSED",
        None => "",
    }
}

/// A ratio and whether it reaches `target`.
fn against(r: Option<f64>, target: f64) -> String {
    format!("{}{}", num(r, 2), verdict(r.map(|x| x >= target)))
}

/// imaged (at its defaults: log level info) against each limit on each filesystem: the targets.
pub fn targets_table(
    sizes: &[usize],
    order: &[Key],
    summaries: &BTreeMap<Key, Summary>,
    bounds: &BTreeMap<usize, u64>,
    small_window: Option<usize>,
) -> String {
    let mut out = String::new();
    let w = small_window.map_or("–".to_string(), |w| w.to_string());
    let _ = writeln!(
        out,
        "| size | filesystem | imaged images/s (at warn) | ÷ original QoS 1 (target ≥ 1.2) | window {w}: imaged ÷ original QoS 1 (target ≥ 1.2) | ÷ best disk floor (target ≥ 0.8) | CPU ms per image vs 1.3 × (disk floor + broker floor) | unloaded p50 ms vs broker floor + 1-writer disk floor + 0.5 ms | ÷ broker floor | ÷ loadgen ceiling | peak RSS MiB vs bound | idle RSS MiB vs 16 |"
    );
    out += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut filesystems: Vec<&str> = Vec::new();
    for (fs, _, _) in order {
        if !fs.is_empty() && !filesystems.contains(&fs.as_str()) {
            filesystems.push(fs);
        }
    }
    for &size in sizes {
        let nodisk = |s: &str| summaries.get(&(String::new(), size, s.to_string()));
        for fs in &filesystems {
            let get = |s: &str| summaries.get(&(fs.to_string(), size, s.to_string()));
            let Some(im) = get(IMAGED) else { continue };
            let r = |s: &str| get(s).and_then(|x| x.rate);
            let warn = r(IMAGED_WARN);
            let best_disk = summaries
                .iter()
                .filter(|((f, z, s), _)| f == fs && *z == size && s.starts_with(DISK))
                .filter(|(_, x)| x.rate.is_some())
                .max_by(|a, b| a.1.rate.unwrap_or(0.0).total_cmp(&b.1.rate.unwrap_or(0.0)));
            let disk_text = match best_disk {
                Some(((_, _, label), d)) => format!(
                    "{} ({})",
                    against(ratio(im.rate, d.rate), 0.8),
                    label.trim_start_matches(DISK).trim_start_matches(", ")
                ),
                None => "–".into(),
            };
            let broker = nodisk(BROKER);
            let cpu = match (
                im.cpu_k,
                best_disk.and_then(|(_, d)| d.harness_cpu_k),
                broker.and_then(|b| b.cpu_k),
            ) {
                (Some(c), Some(d), Some(b)) => {
                    let t = 1.3 * (d + b);
                    format!("{c:.3} vs {t:.3}{}", verdict(Some(c <= t)))
                }
                (Some(c), _, _) => format!("{c:.3}"),
                _ => "–".into(),
            };
            let lat = match (
                im.u50,
                broker.and_then(|b| b.u50),
                get(&disk_label(1)).and_then(|d| d.u50),
            ) {
                (Some(u), Some(b), Some(d)) => {
                    let t = b + d + 0.5;
                    format!("{u:.2} vs {t:.2}{}", verdict(Some(u <= t)))
                }
                (Some(u), _, _) => format!("{u:.2}"),
                _ => "–".into(),
            };
            let small =
                small_window.map(|w| ratio(r(&at_window(IMAGED, w)), r(&at_window(ORIG1, w))));
            let bound = bounds.get(&size).map(|b| *b as f64);
            let rss = match (im.peak_rss_kib, bound) {
                (Some(p), Some(b)) => format!(
                    "{} vs {}{}",
                    mib(Some(p)),
                    mib(Some(b)),
                    verdict(Some(p <= b))
                ),
                (Some(p), None) => mib(Some(p)),
                _ => "–".into(),
            };
            let idle = im
                .idle_rss_kib
                .map(|k| format!("{}{}", mib(Some(k)), verdict(Some(k <= 16.0 * 1024.0))))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                out,
                "| {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                size_label(size),
                fs,
                rate(im.rate),
                rate(warn),
                against(ratio(im.rate, r(ORIG1)), 1.2),
                small.map_or("–".into(), |x| against(x, 1.2)),
                disk_text,
                cpu,
                lat,
                num(ratio(im.rate, broker.and_then(|b| b.rate)), 2),
                num(ratio(im.rate, nodisk(LOOP).and_then(|b| b.rate)), 2),
                rss,
                idle
            );
        }
    }
    out
}

/// Every run's figures, one line each, tab-separated (for a closer look or a plot).
pub fn runs_tsv(measures: &[Measure]) -> String {
    let mut out = String::from(
        "filesystem\tsize\tsubject\trun\timages\timages_per_s\tp50_ms\tp99_ms\tunloaded_p50_ms\tunloaded_p99_ms\tcpu_s_per_1000\tbroker_cpu_s_per_1000\tharness_cpu_s_per_1000\tmachine_busy\tothers_busy\tpeak_rss_kib\tidle_rss_kib\tafter_rss_kib\tsurvived\tlost\tduplicates\tfailure\n",
    );
    let o = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
    let k = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for m in measures {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{:.2}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            m.fs,
            m.size,
            m.subject,
            m.run,
            m.images,
            m.rate,
            o(m.p50),
            o(m.p99),
            o(m.u50),
            o(m.u99),
            o(m.cpu_k),
            o(m.broker_cpu_k),
            o(m.harness_cpu_k),
            o(m.busy),
            o(m.others),
            k(m.peak_rss_kib),
            k(m.idle_rss_kib),
            k(m.after_rss_kib),
            m.survived.map(|(_, i)| i.to_string()).unwrap_or_default(),
            m.lost,
            m.duplicates,
            m.failure.clone().unwrap_or_default()
        );
    }
    out
}
