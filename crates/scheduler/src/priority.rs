//! Request classes and the per-class scheduling policy.
//!
//! The platform names five request types (seed-requirements.md, Workload),
//! highest first; a request's base [`Priority`] is its type. Aging
//! ([`Aging`]) raises the *effective* priority of a request that waited
//! long, so background work cannot starve (serving-systems.md §9.1:
//! Triton has strict levels and no aging).

use std::fmt;
use std::time::Duration;

/// A request class, 1 (highest) to 5 (lowest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

/// The request-type names, index 0 is priority 1.
const NAMES: [&str; Priority::LEVELS] = [
    "real_time_trading",
    "market_data_update",
    "batch_processing",
    "historical_analysis",
    "background",
];
const LABELS: [&str; Priority::LEVELS] = ["1", "2", "3", "4", "5"];

impl Priority {
    pub const LEVELS: usize = 5;
    pub const HIGHEST: Priority = Priority(1);
    pub const LOWEST: Priority = Priority(5);
    /// Every class, highest first.
    pub const ALL: [Priority; Priority::LEVELS] = [
        Priority(1),
        Priority(2),
        Priority(3),
        Priority(4),
        Priority(5),
    ];

    /// The class of level `level` (1–5); `None` outside that range.
    pub fn new(level: i64) -> Option<Priority> {
        (1..=Self::LEVELS as i64)
            .contains(&level)
            .then_some(Priority(level as u8))
    }

    /// The class of a request-type name (`"real_time_trading"`, …).
    pub fn from_name(name: &str) -> Option<Priority> {
        NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| Priority(i as u8 + 1))
    }

    /// Parses a level (`"1"`) or a request-type name.
    pub fn parse(text: &str) -> Option<Priority> {
        let text = text.trim();
        text.parse::<i64>()
            .ok()
            .and_then(Priority::new)
            .or_else(|| Priority::from_name(text))
    }

    pub fn level(self) -> u8 {
        self.0
    }

    /// 0 for priority 1 … 4 for priority 5: an index into per-class arrays.
    pub fn index(self) -> usize {
        usize::from(self.0 - 1)
    }

    /// The request-type name.
    pub fn name(self) -> &'static str {
        NAMES[self.index()]
    }

    /// The `priority` label value of metrics (`"1"` … `"5"`).
    pub fn label(self) -> &'static str {
        LABELS[self.index()]
    }

    /// For error messages: what a client may send.
    pub fn allowed() -> String {
        let names: Vec<String> = Priority::ALL
            .iter()
            .map(|p| format!("{} = {}", p.0, p.name()))
            .collect();
        format!(
            "an integer 1 (highest) to 5 (lowest), or a request type: {}",
            names.join(", ")
        )
    }

    /// This class raised by `levels`, never above priority 1.
    pub fn raised(self, levels: u8) -> Priority {
        Priority(self.0.saturating_sub(levels).max(1))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

/// How one class is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Longest a request of this class waits for others to join its batch
    /// (counted from its arrival). An upper bound: an idle engine does not
    /// wait at all unless the arrival rate makes waiting useful.
    pub max_queue_delay: Duration,
    /// Most requests of this class waiting at once.
    pub max_queue_size: usize,
    /// Deadline of a request that sets no `timeout`.
    pub default_timeout: Duration,
    /// Whether a request may set a shorter `timeout` of its own.
    pub allow_timeout_override: bool,
    /// The latency this class is promised (`None`: best effort). A batch
    /// holding a request of this class is padded with lower classes only
    /// while the predicted engine time still meets it, and batches of
    /// lower classes run in chunks short enough that a request of this
    /// class waits at most one chunk (docs/scheduling.md).
    pub target_latency: Option<Duration>,
}

impl ClassPolicy {
    /// The seed's defaults (seed-requirements.md, Dynamic batching:
    /// HIGH 2 ms, NORMAL 5 ms, LOW 20 ms; queues of 1000). Real-time
    /// trading is promised 2 ms and market-data updates 5 ms; the other
    /// classes are best effort.
    pub fn default_for(priority: Priority) -> ClassPolicy {
        let (delay_ms, timeout_ms, target_ms) = match priority.level() {
            1 => (2, 100, Some(2)),
            2 => (2, 200, Some(5)),
            3 => (5, 1_000, None),
            4 => (20, 5_000, None),
            _ => (20, 10_000, None),
        };
        ClassPolicy {
            max_queue_delay: Duration::from_millis(delay_ms),
            max_queue_size: 1000,
            default_timeout: Duration::from_millis(timeout_ms),
            allow_timeout_override: true,
            target_latency: target_ms.map(Duration::from_millis),
        }
    }
}
/// A set of request classes: the classes a reserved engine instance takes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassSet(u8);

impl ClassSet {
    /// Every class: an instance that serves all traffic.
    pub const ALL: ClassSet = ClassSet((1 << Priority::LEVELS) - 1);

    /// The set of the given classes.
    pub fn of(classes: impl IntoIterator<Item = Priority>) -> ClassSet {
        ClassSet(
            classes
                .into_iter()
                .fold(0, |bits, p| bits | (1 << p.index())),
        )
    }

    pub fn contains(self, priority: Priority) -> bool {
        self.0 & (1 << priority.index()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of classes in the set.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether every class of `other` is in this set.
    pub fn covers(self, other: ClassSet) -> bool {
        other.0 & !self.0 == 0
    }

    /// The classes of the set, highest first.
    pub fn iter(self) -> impl Iterator<Item = Priority> {
        Priority::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

impl Default for ClassSet {
    fn default() -> Self {
        ClassSet::ALL
    }
}

impl fmt::Debug for ClassSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Priority::level))
            .finish()
    }
}

impl fmt::Display for ClassSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let levels: Vec<String> = self.iter().map(|p| p.level().to_string()).collect();
        write!(f, "{}", levels.join(","))
    }
}

/// Priority aging: a request that waited longer than `threshold` gains one
/// level, and one more per further `interval`, at most `max_levels`, never
/// above priority 1 (seed-requirements.md, Prioritisation with aging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aging {
    pub threshold: Duration,
    pub interval: Duration,
    pub max_levels: u8,
}

impl Default for Aging {
    fn default() -> Self {
        Aging {
            threshold: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            max_levels: 2,
        }
    }
}

impl Aging {
    /// Levels gained after waiting `waited`.
    pub fn levels(&self, waited: Duration) -> u8 {
        if self.max_levels == 0 || waited <= self.threshold {
            return 0;
        }
        let beyond = waited - self.threshold;
        let further = if self.interval.is_zero() {
            u128::from(self.max_levels)
        } else {
            beyond.as_nanos() / self.interval.as_nanos()
        };
        (1 + further).min(u128::from(self.max_levels)) as u8
    }

    /// The effective priority of a request of class `base` that waited
    /// `waited`.
    pub fn effective(&self, base: Priority, waited: Duration) -> Priority {
        base.raised(self.levels(waited))
    }

    /// How long a request waits until it has gained every level it can:
    /// from then on it is *starving* and is guaranteed a place in every
    /// batch (see [`crate::queue`]).
    pub fn fully_aged_after(&self) -> Duration {
        if self.max_levels == 0 {
            return Duration::MAX;
        }
        // `levels` needs strictly more than the threshold; one nanosecond
        // past it counts.
        self.threshold + self.interval * u32::from(self.max_levels - 1) + Duration::from_nanos(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_names_round_trip() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_name(p.name()), Some(p));
            assert_eq!(Priority::parse(p.label()), Some(p));
            assert_eq!(Priority::new(i64::from(p.level())), Some(p));
        }
        assert_eq!(Priority::new(0), None);
        assert_eq!(Priority::new(6), None);
        assert_eq!(Priority::from_name("urgent"), None);
        assert!(Priority::allowed().contains("5 = background"));
    }

    #[test]
    fn aging_gains_one_level_per_interval_after_the_threshold_at_most_two() {
        let aging = Aging::default();
        let p5 = Priority::LOWEST;
        let ms = Duration::from_millis;
        assert_eq!(aging.effective(p5, ms(1000)).level(), 5);
        assert_eq!(aging.effective(p5, ms(1001)).level(), 4);
        assert_eq!(aging.effective(p5, ms(1999)).level(), 4);
        assert_eq!(aging.effective(p5, ms(2000)).level(), 3);
        assert_eq!(aging.effective(p5, ms(60_000)).level(), 3);
        // Never above 1.
        assert_eq!(aging.effective(Priority(2), ms(60_000)).level(), 1);
        assert_eq!(aging.effective(Priority::HIGHEST, ms(60_000)).level(), 1);
        assert_eq!(aging.fully_aged_after(), ms(2000) + Duration::from_nanos(1));
        assert_eq!(aging.levels(aging.fully_aged_after()), 2);
    }

    #[test]
    fn class_sets_hold_what_they_were_given() {
        let p = |l| Priority::new(l).unwrap();
        let realtime = ClassSet::of([p(1), p(2)]);
        assert!(realtime.contains(p(1)) && realtime.contains(p(2)));
        assert!(!realtime.contains(p(3)));
        assert_eq!(realtime.len(), 2);
        assert!(ClassSet::ALL.covers(realtime));
        assert!(!realtime.covers(ClassSet::ALL));
        assert_eq!(realtime.to_string(), "1,2");
        assert_eq!(ClassSet::ALL.iter().count(), Priority::LEVELS);
        assert!(ClassSet::of([]).is_empty());
    }
}
