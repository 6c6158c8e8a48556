//! The adaptive batch-size controller: a pure rule the batcher applies once
//! per `interval` to the live max batch size.
//!
//! Default policy (seed-requirements.md, Dynamic batching): halve above
//! 85 % utilisation, double below 30 % utilisation while memory is under
//! 70 %, between `min_batch_size` and the model's `max_batch_size`. On top
//! of that (serving-systems.md §9.8) it halves when the p99 latency of the
//! highest class nears that class's SLO, so real-time latency wins over
//! throughput. No rule goes below the batch size that keeps up with the
//! rows arriving, and past capacity the size doubles: a smaller batch costs
//! the engine efficiency, so under a load at or past capacity shrinking
//! would only lower the capacity and let admitted requests expire (the
//! overload of docs/scheduling.md).

use std::time::Duration;

/// Thresholds of the controller; percentages are 0–100.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// How often the controller runs.
    pub interval: Duration,
    pub min_batch_size: usize,
    /// Halve above this CPU (or GPU) utilisation.
    pub shrink_above_utilisation: f64,
    /// Double below this utilisation…
    pub grow_below_utilisation: f64,
    /// …while memory use is below this.
    pub grow_below_memory: f64,
    /// The priority-1 p99 latency objective.
    pub slo_p99: Duration,
    /// Halve when the priority-1 p99 exceeds this fraction of `slo_p99`.
    pub slo_margin: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            min_batch_size: 1,
            shrink_above_utilisation: 85.0,
            grow_below_utilisation: 30.0,
            grow_below_memory: 70.0,
            slo_p99: Duration::from_millis(50),
            slo_margin: 0.8,
        }
    }
}

/// What the controller sees each interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// CPU utilisation of the machine, percent; `None` before the first
    /// sample.
    pub cpu: Option<f64>,
    /// GPU utilisation, percent, when a GPU is monitored.
    pub gpu: Option<f64>,
    /// Memory use, percent.
    pub memory: Option<f64>,
    /// p99 latency of priority-1 requests answered in the interval.
    pub p99_highest: Option<Duration>,
    /// The smallest batch that keeps up with the rows that arrived in the
    /// interval; `None` before the engine time has been measured.
    pub keep_up: Option<KeepUp>,
}

/// Which live batch sizes keep up with the arrivals, from the engine-time
/// fit (`LatencyModel::rows_to_keep_up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepUp {
    /// Batches of at least this many rows.
    From(usize),
    /// None: more rows arrive than the engine serves at any batch size.
    Never,
}

/// Why the controller moved (or kept) the batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    ShrinkForSlo,
    ShrinkForUtilisation,
    /// A shrink was due, but a smaller batch would not keep up with the
    /// arrivals: the size stays at what keeps up.
    HoldForLoad,
    /// The current size does not keep up with the arrivals: grown to the
    /// size that does, or doubled when none does.
    GrowForLoad,
    Grow,
    Keep,
}

impl AdaptiveConfig {
    /// The next live batch size and why.
    pub fn step(&self, current: usize, max: usize, seen: &Observation) -> (usize, Decision) {
        let min = self.min_batch_size.clamp(1, max.max(1));
        let utilisation = match (seen.cpu, seen.gpu) {
            (Some(c), Some(g)) => Some(c.max(g)),
            (c, g) => c.or(g),
        };
        let near_slo = seen
            .p99_highest
            .is_some_and(|p99| p99.as_secs_f64() > self.slo_p99.as_secs_f64() * self.slo_margin);
        let (next, why) = if near_slo {
            (current / 2, Decision::ShrinkForSlo)
        } else if utilisation.is_some_and(|u| u > self.shrink_above_utilisation) {
            (current / 2, Decision::ShrinkForUtilisation)
        } else if utilisation.is_some_and(|u| u < self.grow_below_utilisation)
            && seen.memory.is_some_and(|m| m < self.grow_below_memory)
        {
            (current.saturating_mul(2), Decision::Grow)
        } else {
            (current, Decision::Keep)
        };
        let next = next.clamp(min, max.max(min));
        // The batch that keeps up with the arrivals is a floor for every
        // rule; past capacity the size doubles towards the most the engine
        // serves.
        let floor = match seen.keep_up {
            Some(KeepUp::From(rows)) => rows.min(max),
            Some(KeepUp::Never) => current.saturating_mul(2).min(max),
            None => next,
        };
        if floor > next {
            let why = if floor > current {
                Decision::GrowForLoad
            } else {
                Decision::HoldForLoad
            };
            return (floor, why);
        }
        (next, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(cpu: f64, memory: f64, p99_ms: Option<u64>) -> Observation {
        Observation {
            cpu: Some(cpu),
            gpu: None,
            memory: Some(memory),
            p99_highest: p99_ms.map(Duration::from_millis),
            keep_up: None,
        }
    }

    #[test]
    fn the_seed_rules_halve_and_double_within_bounds() {
        let c = AdaptiveConfig::default();
        assert_eq!(
            c.step(32, 128, &seen(90.0, 50.0, None)),
            (16, Decision::ShrinkForUtilisation)
        );
        assert_eq!(c.step(1, 128, &seen(90.0, 50.0, None)).0, 1);
        assert_eq!(
            c.step(16, 128, &seen(20.0, 50.0, None)),
            (32, Decision::Grow)
        );
        assert_eq!(c.step(100, 128, &seen(20.0, 50.0, None)).0, 128);
        // Low utilisation but memory tight: keep.
        assert_eq!(
            c.step(16, 128, &seen(20.0, 75.0, None)),
            (16, Decision::Keep)
        );
        assert_eq!(
            c.step(16, 128, &seen(50.0, 50.0, None)),
            (16, Decision::Keep)
        );
        // No sample yet: keep.
        assert_eq!(
            c.step(16, 128, &Observation::default()),
            (16, Decision::Keep)
        );
    }

    #[test]
    fn a_gpu_above_target_shrinks_even_with_an_idle_cpu() {
        let c = AdaptiveConfig::default();
        let mut s = seen(10.0, 10.0, None);
        s.gpu = Some(95.0);
        assert_eq!(c.step(32, 32, &s), (16, Decision::ShrinkForUtilisation));
    }

    #[test]
    fn the_highest_class_nearing_its_slo_shrinks_first() {
        let c = AdaptiveConfig::default();
        // 41 ms > 80 % of 50 ms, even though the CPU has headroom.
        assert_eq!(
            c.step(32, 32, &seen(10.0, 10.0, Some(41))),
            (16, Decision::ShrinkForSlo)
        );
        assert_eq!(
            c.step(16, 32, &seen(10.0, 10.0, Some(39))),
            (32, Decision::Grow)
        );
    }

    #[test]
    fn no_rule_goes_below_the_batch_that_keeps_up_with_arrivals() {
        let c = AdaptiveConfig::default();
        let mut s = seen(95.0, 10.0, Some(45));
        // 8 rows keep up: halving 32 stops at 8 (not 16 → 8 → … → 1).
        s.keep_up = Some(KeepUp::From(8));
        assert_eq!(c.step(32, 32, &s), (16, Decision::ShrinkForSlo));
        assert_eq!(c.step(16, 32, &s), (8, Decision::ShrinkForSlo));
        assert_eq!(c.step(8, 32, &s), (8, Decision::HoldForLoad));
        // Below it, the size grows to it whatever the utilisation says.
        assert_eq!(c.step(2, 32, &s), (8, Decision::GrowForLoad));
        s.keep_up = Some(KeepUp::From(100));
        assert_eq!(c.step(2, 32, &s), (32, Decision::GrowForLoad));
        // Past capacity nothing keeps up: the size doubles up to the max.
        s.keep_up = Some(KeepUp::Never);
        assert_eq!(c.step(4, 32, &s), (8, Decision::GrowForLoad));
        assert_eq!(c.step(32, 32, &s), (32, Decision::HoldForLoad));
        // Growing for utilisation is not held back.
        let mut idle = seen(10.0, 10.0, None);
        idle.keep_up = Some(KeepUp::From(2));
        assert_eq!(c.step(8, 32, &idle), (16, Decision::Grow));
    }
}
