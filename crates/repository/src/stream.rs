//! The `[stream]` table of a model's config.toml: how the server keeps
//! per-instrument windows for clients that send only the new rows
//! (Triton's sequence parameters; docs/streams.md).
//!
//! Parsed and checked here with the rest of the model's configuration; the
//! server's stream store (crates/server/src/streams) enforces it.

use std::time::Duration;

use serde::Deserialize;

/// What a stream answers before its window holds T rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupPolicy {
    /// Keep the rows, run nothing, and answer 409 saying how many rows are
    /// still missing.
    #[default]
    Reject,
    /// Run the model on the window padded at the front (the oldest time
    /// steps) to T rows; `pad` says with what.
    Pad,
}

/// What fills the missing oldest rows under `warmup = "pad"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PadWith {
    /// Rows of zeros.
    #[default]
    Zeros,
    /// Copies of the stream's oldest row.
    FirstRow,
}

/// The model's stream policy (`[stream]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Whether requests may name a stream (`sequence_id`).
    pub enabled: bool,
    /// Before the window is full: "reject" or "pad".
    pub warmup: WarmupPolicy,
    /// With `warmup = "pad"`: "zeros" or "first_row".
    pub pad: PadWith,
    /// Most live streams of one model version; the least recently used
    /// stream is evicted to make room for a new one.
    pub max_streams: usize,
    /// Most bytes the windows (and their ids) of one model version may
    /// hold; the least recently used streams are evicted to stay under it.
    pub max_memory_bytes: u64,
    /// A stream without a request for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Requests of one stream waiting for the one in flight (they are
    /// served one at a time, in arrival order); more are refused with 429.
    pub max_pending: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            enabled: true,
            warmup: WarmupPolicy::Reject,
            pad: PadWith::Zeros,
            max_streams: 10_000,
            max_memory_bytes: 256 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_pending: 16,
        }
    }
}

impl StreamConfig {
    /// The rules the table must follow; a message naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.max_streams == 0 {
            return Err("stream.max_streams must be at least 1".into());
        }
        if self.max_memory_bytes == 0 {
            return Err("stream.max_memory_bytes must be at least 1".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("stream.idle_timeout must be above zero".into());
        }
        if self.max_pending == 0 {
            return Err("stream.max_pending must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_with_defaults_and_checks() {
        let config: StreamConfig = toml::from_str(
            "warmup = \"pad\"\npad = \"first_row\"\nmax_streams = 5\nidle_timeout = \"2s\"",
        )
        .unwrap();
        assert_eq!(config.warmup, WarmupPolicy::Pad);
        assert_eq!(config.pad, PadWith::FirstRow);
        assert_eq!(config.max_streams, 5);
        assert_eq!(config.idle_timeout, Duration::from_secs(2));
        assert_eq!(config.max_pending, StreamConfig::default().max_pending);
        assert!(config.check().is_ok());
        let zero: StreamConfig = toml::from_str("max_streams = 0").unwrap();
        assert!(zero.check().unwrap_err().contains("max_streams"));
        assert!(toml::from_str::<StreamConfig>("warmup = \"wait\"").is_err());
        assert!(toml::from_str::<StreamConfig>("windows = 3").is_err());
    }
}
