//! CPU and memory limits and usage of the process's cgroup (v2), so that
//! utilisation is measured against what the container may use, not the
//! whole host.
//!
//! A pod limited to 2 CPUs on a 64-core node at 100 % of its quota is
//! 3 % busy host-wide; against its cgroup it is 100 % busy, which is what
//! the adaptive controller and the SLA view need. Without cgroup v2, or
//! with no limit set (`max`), the callers fall back to host-wide figures.
//!
//! Files read, under the cgroup's directory:
//! - `cpu.max`: `"$QUOTA $PERIOD"` in µs, or `"max $PERIOD"` (no limit);
//! - `cpu.stat`: `usage_usec N` among other lines;
//! - `memory.max`: bytes, or `max`;
//! - `memory.current`: bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup v2 is mounted.
const MOUNT: &str = "/sys/fs/cgroup";

/// CPUs the quota allows (`quota / period`); `None` without a limit.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?.parse::<f64>().ok()?;
    let period = fields
        .next()
        .map_or(Some(100_000.0), |p| p.parse::<f64>().ok())?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// A byte count of `memory.max` or `memory.current`; `None` for `max`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// CPU time used by the cgroup since it was created (`usage_usec` of
/// `cpu.stat`).
pub fn parse_cpu_usage(cpu_stat: &str) -> Option<Duration> {
    cpu_stat.lines().find_map(|line| {
        let usec = line.strip_prefix("usage_usec ")?.trim().parse().ok()?;
        Some(Duration::from_micros(usec))
    })
}

/// The cgroup path of this process in `/proc/self/cgroup` (`0::/path`).
pub fn parse_self_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
}

/// One cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// The cgroup at `dir` (tests point it at sample files).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Cgroup { dir: dir.into() }
    }

    /// This process's cgroup, when cgroup v2 is mounted. Inside a
    /// container with its own cgroup namespace the path is `/`, the mount
    /// itself.
    pub fn detect() -> Option<Self> {
        let mount = Path::new(MOUNT);
        if !mount.join("cgroup.controllers").is_file() {
            return None;
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| parse_self_path(&text).map(|p| mount.join(p.trim_start_matches('/'))))
            .filter(|dir| dir.join("cpu.stat").is_file());
        Some(Cgroup::at(own.unwrap_or_else(|| mount.to_path_buf())))
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    /// CPUs the cgroup may use; `None` without a CPU limit.
    pub fn cpu_limit(&self) -> Option<f64> {
        parse_cpu_max(&self.read("cpu.max")?)
    }

    /// CPU time the cgroup has used.
    pub fn cpu_usage(&self) -> Option<Duration> {
        parse_cpu_usage(&self.read("cpu.stat")?)
    }

    /// Memory limit in bytes; `None` without one.
    pub fn memory_limit(&self) -> Option<u64> {
        parse_bytes(&self.read("memory.max")?)
    }

    /// Memory in use, bytes.
    pub fn memory_current(&self) -> Option<u64> {
        parse_bytes(&self.read("memory.current")?)
    }

    /// Memory in use as a percentage of the limit; `None` without a limit.
    pub fn memory_percent(&self) -> Option<f64> {
        let limit = self.memory_limit().filter(|&l| l > 0)?;
        Some(self.memory_current()? as f64 * 100.0 / limit as f64)
    }
}

/// CPU utilisation of a cgroup against its quota, from the growth of its
/// usage between two samples.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Option<(Instant, Duration)>,
}

impl CpuMeter {
    /// Percent of the quota used since the previous sample (may exceed
    /// 100 briefly: the quota is enforced per period); `None` on the first
    /// sample or without a CPU limit.
    pub fn sample(&mut self, cgroup: &Cgroup, now: Instant) -> Option<f64> {
        let used = cgroup.cpu_usage()?;
        let previous = self.last.replace((now, used));
        let limit = cgroup.cpu_limit()?;
        let (then, used_then) = previous?;
        let wall = now.checked_duration_since(then)?.as_secs_f64();
        (wall > 0.0).then(|| used.saturating_sub(used_then).as_secs_f64() * 100.0 / (wall * limit))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A cgroup directory with the given files.
    fn sample(files: &[(&str, &str)]) -> Cgroup {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tickserve-cgroup-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Cgroup::at(dir)
    }

    #[test]
    fn limits_are_read_and_max_means_none() {
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_bytes("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_bytes("max\n"), None);
        let stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n";
        assert_eq!(parse_cpu_usage(stat), Some(Duration::from_millis(2500)));
        assert_eq!(
            parse_self_path("0::/kubepods/pod1/abc\n"),
            Some("/kubepods/pod1/abc")
        );
        assert_eq!(parse_self_path("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn memory_percent_is_against_the_limit() {
        let limited = sample(&[
            ("memory.max", "1073741824\n"),
            ("memory.current", "268435456\n"),
        ]);
        assert_eq!(limited.memory_percent(), Some(25.0));
        let unlimited = sample(&[("memory.max", "max\n"), ("memory.current", "268435456\n")]);
        assert_eq!(unlimited.memory_percent(), None);
        assert_eq!(unlimited.memory_current(), Some(268_435_456));
        assert_eq!(sample(&[]).memory_percent(), None);
    }

    #[test]
    fn cpu_percent_is_usage_growth_over_the_quota() {
        let cgroup = sample(&[
            ("cpu.max", "200000 100000\n"),
            ("cpu.stat", "usage_usec 1000000\n"),
        ]);
        let mut meter = CpuMeter::default();
        let start = Instant::now();
        assert_eq!(meter.sample(&cgroup, start), None, "first sample");
        // One more CPU-second in one wall second, of a 2-CPU quota: 50 %.
        std::fs::write(cgroup.dir.join("cpu.stat"), "usage_usec 2000000\n").unwrap();
        let percent = meter
            .sample(&cgroup, start + Duration::from_secs(1))
            .unwrap();
        assert!((percent - 50.0).abs() < 1e-9, "{percent}");
        let unlimited = sample(&[("cpu.max", "max 100000\n"), ("cpu.stat", "usage_usec 5\n")]);
        let mut meter = CpuMeter::default();
        meter.sample(&unlimited, start);
        assert_eq!(
            meter.sample(&unlimited, start + Duration::from_secs(1)),
            None
        );
    }
}
