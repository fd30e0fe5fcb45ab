//! What the kernel says about a process and the machine: CPU time, RSS, peak RSS, and the machine's busy time.

use std::fs;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process, all its threads (utime + stime of /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// A `kB` line of /proc/PID/status (VmRSS, VmHWM), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0, writing 5 to clear_refs), so a peak belongs to one phase.
pub fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The machine's (busy, total) CPU time in ticks, from the first line of /proc/stat.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU seconds of a set of processes, and of the machine, over one phase of a run.
pub struct CpuMeter {
    pids: Vec<Option<u32>>,
    start: Vec<Option<f64>>,
    machine: Option<(u64, u64)>,
}

pub struct CpuUse {
    /// Per process, in the order given.
    pub seconds: Vec<Option<f64>>,
    /// Share of all the machine's cores that was busy, 0 to 1.
    pub machine_busy: Option<f64>,
}

impl CpuMeter {
    pub fn start(pids: &[Option<u32>]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start: pids.iter().map(|p| p.and_then(cpu_seconds)).collect(),
            machine: machine_ticks(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let seconds = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|(pid, start)| Some(cpu_seconds((*pid)?)? - (*start)?))
            .collect();
        let machine_busy = match (self.machine, machine_ticks()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        CpuUse {
            seconds,
            machine_busy,
        }
    }
}
