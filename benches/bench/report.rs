//! Figures of one measurement, their medians over runs, and the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What one subject did in one run at one size.
#[derive(Debug, Clone, Default)]
pub struct Measure {
    pub subject: &'static str,
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
pub const LOOP: &str = "loadgen ceiling";
pub const BROKER: &str = "broker floor";
pub const DISK: &str = "disk floor";
pub const ORIG0: &str = "original QoS 0";
pub const ORIG1: &str = "original QoS 1";
pub const ORDER: [&str; 6] = [IMAGED, LOOP, BROKER, DISK, ORIG0, ORIG1];

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

pub fn summarize(measures: &[Measure]) -> BTreeMap<(usize, &'static str), Summary> {
    let mut groups: BTreeMap<(usize, &'static str), Vec<&Measure>> = BTreeMap::new();
    for m in measures {
        groups.entry((m.size, m.subject)).or_default().push(m);
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

/// The table of every subject at every size.
pub fn figures_table(
    sizes: &[usize],
    summaries: &BTreeMap<(usize, &'static str), Summary>,
) -> String {
    let mut out = String::new();
    out += "| size | what | images/s (min–max) | MB/s | latency p50 / p99 ms | unloaded p50 / p99 ms | CPU s per 1000 | broker CPU s per 1000 | harness CPU s per 1000 | machine busy % (others) | peak RSS MiB | idle RSS MiB (after load) | notes |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for &size in sizes {
        for subject in ORDER {
            let Some(s) = summaries.get(&(size, subject)) else {
                continue;
            };
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
                "| {} | {} | {}{} | {} | {} / {} | {} / {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
                size_label(size),
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

/// imaged as ratios to each limit, and the targets.
pub fn targets_table(
    sizes: &[usize],
    summaries: &BTreeMap<(usize, &'static str), Summary>,
    bounds: &BTreeMap<usize, u64>,
) -> String {
    let mut out = String::new();
    out += "| size | imaged images/s | ÷ loadgen ceiling | ÷ broker floor | ÷ disk floor | ÷ 0.8 × min(broker, disk) (target ≥ 1) | ÷ original QoS 0 (target > 1) | ÷ original QoS 1 (target > 1) | unloaded p50 ms vs broker p50 + write p50 + 1 ms | peak RSS MiB vs bound | idle RSS MiB vs 16 |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for &size in sizes {
        let get = |s: &'static str| summaries.get(&(size, s));
        let Some(im) = get(IMAGED) else { continue };
        let r = |s: &'static str| get(s).and_then(|x| x.rate);
        let floor = match (r(BROKER), r(DISK)) {
            (Some(a), Some(b)) => Some(0.8 * a.min(b)),
            _ => None,
        };
        let to_floor = ratio(im.rate, floor);
        let o0 = ratio(im.rate, r(ORIG0));
        let o1 = ratio(im.rate, r(ORIG1));
        let lat_target = match (
            get(BROKER).and_then(|b| b.u50),
            get(DISK).and_then(|d| d.u50),
        ) {
            (Some(b), Some(d)) => Some(b + d + 1.0),
            _ => None,
        };
        let lat = match (im.u50, lat_target) {
            (Some(u), Some(t)) => format!("{u:.2} vs {t:.2}{}", verdict(Some(u <= t))),
            (Some(u), None) => format!("{u:.2}"),
            _ => "–".into(),
        };
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
            "| {} | {} | {} | {} | {} | {}{} | {}{} | {}{} | {} | {} | {} |",
            size_label(size),
            rate(im.rate),
            num(ratio(im.rate, r(LOOP)), 2),
            num(ratio(im.rate, r(BROKER)), 2),
            num(ratio(im.rate, r(DISK)), 2),
            num(to_floor, 2),
            verdict(to_floor.map(|x| x >= 1.0)),
            num(o0, 2),
            verdict(o0.map(|x| x > 1.0)),
            num(o1, 2),
            verdict(o1.map(|x| x > 1.0)),
            lat,
            rss,
            idle
        );
    }
    out
}

/// Every run's figures, one line each, tab-separated (for a closer look or a plot).
pub fn runs_tsv(measures: &[Measure]) -> String {
    let mut out = String::from(
        "size\tsubject\trun\timages\timages_per_s\tp50_ms\tp99_ms\tunloaded_p50_ms\tunloaded_p99_ms\tcpu_s_per_1000\tbroker_cpu_s_per_1000\tharness_cpu_s_per_1000\tmachine_busy\tothers_busy\tpeak_rss_kib\tidle_rss_kib\tafter_rss_kib\tsurvived\tlost\tduplicates\tfailure\n",
    );
    let o = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
    let k = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for m in measures {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{:.2}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
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
