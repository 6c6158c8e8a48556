//! `tickserve bench <mode>`: the command-line options (clap) and the
//! drivers that turn them into runs, a [`Report`] and an exit code.
//!
//! [`run`] here dispatches on the mode: the options are in `args`
//! (re-exported), the shared preparation (workload, target, input from
//! the model's metadata, SLA) in `setup`, and one driver per mode in
//! `modes`; the report is judged and written here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::BenchError;
use crate::mixed::{MixedGoals, MixedPlan};
use crate::report::{CompareReport, Report, SCHEMA, StressReport, StressStep, improvement};
use crate::run::{Arrival, Limits, Measured, OpenLoop, Progress, Target, closed_loop, open_loop};
use crate::sla::{Compliance, Sla, evaluate};
use crate::stats::RunStats;
use crate::workload::{InputSource, Protocol, Workload, WorkloadSpec};

mod args;
mod modes;
mod setup;

pub use args::*;
use modes::*;
use setup::*;

/// The outcome of `tickserve bench`: the report (already written where
/// asked) and the process exit code (0 compliant, 3 not).
#[derive(Debug)]
pub struct Finished {
    pub report: Report,
    pub exit_code: u8,
}

/// Runs one bench mode to completion. Must be called inside a tokio
/// runtime.
pub async fn run(args: BenchArgs) -> Result<Finished, BenchError> {
    let settings = settings_json(&args.mode);
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (mode_name, common) = match &args.mode {
        Mode::Latency { common, .. } => ("latency", common),
        Mode::Load { common, .. } => ("load", common),
        Mode::Rate { common, .. } => ("rate", common),
        Mode::Stress { common, .. } => ("stress", common),
        Mode::Compare { common, .. } => ("compare", common),
        Mode::Mixed { common, .. } => ("mixed", common),
        Mode::Streams { common, .. } => ("streams", common),
    };
    let common = resolve_input(common.clone()).await;
    // Record the input as sent, also when it came from the metadata.
    let mut settings = settings;
    if let Some(recorded) = settings
        .get_mut(mode_name)
        .and_then(|m| m.get_mut("common"))
    {
        recorded["shape"] = serde_json::json!(common.shape);
        recorded["input_name"] = serde_json::json!(common.input_name);
        recorded["datatype"] = serde_json::json!(common.datatype);
    }
    let sla = load_sla(&common)?;
    let params = parse_params(&common.params)?;
    let show = !common.quiet;
    let mut stress = None;
    let mut compare = None;
    let mut mixed = None;
    let mut streams = None;
    let (result, compliance): (RunStats, Compliance) = match args.mode {
        Mode::Latency { requests, .. } => {
            let t = target(&common, &common.url, 1)?;
            let w = workload(&common, params)?;
            let limits = Limits {
                duration: None,
                count: Some(requests),
            };
            let progress = Progress::new(show, "latency", limits);
            let m = closed_loop(&t, w, 1, limits, common.warmup, &progress).await;
            progress.finish();
            judge(m, &sla)
        }
        Mode::Load { load, .. } => {
            let t = target(&common, &common.url, load.concurrency)?;
            let w = workload(&common, params)?;
            let m = run_load(
                &t,
                w,
                load.concurrency,
                load.duration,
                load.max_requests,
                &common,
            )
            .await;
            judge(m, &sla)
        }
        Mode::Rate { rate, .. } => {
            let t = target(&common, &common.url, rate.max_in_flight)?;
            let w = workload(&common, params)?;
            let open = OpenLoop {
                rate: rate.rate,
                arrival: rate.arrival,
                max_in_flight: rate.max_in_flight,
                late_threshold: rate.late_threshold,
                seed: common.seed,
            };
            let m = run_rate(&t, w, open, rate.duration, rate.max_requests, &common).await;
            judge(m, &sla)
        }
        Mode::Stress { stress: s, .. } => {
            let report = run_stress(&common, &s, params, &sla).await?;
            let pick = report
                .steps
                .iter()
                .rev()
                .find(|st| Some(st.level) == report.last_compliant_level)
                .or(report.steps.first())
                .map(|st| (st.stats.clone(), st.compliance.clone()));
            let (stats, compliance) = pick.ok_or_else(|| {
                BenchError::Config("the stress run had no steps (check --start/--max)".into())
            })?;
            // Compliant when at least one step met the SLA.
            let compliance = Compliance {
                compliant: report.last_compliant_level.is_some(),
                ..compliance
            };
            stress = Some(report);
            (stats, compliance)
        }
        Mode::Compare { compare: c, .. } => {
            let report = run_compare(&common, &c, params).await?;
            let last = report.candidate_runs.last().cloned().unwrap_or_default();
            let compliance = evaluate(&last, &sla);
            compare = Some(report);
            (last, compliance)
        }
        Mode::Mixed { mixed: m, .. } => {
            let outcome = run_mixed(&common, &m, params).await?;
            // The SLA file's checks join the goals only when one is given.
            let sla_checks = common.sla.is_some().then(|| evaluate(&outcome.both, &sla));
            let compliance = crate::mixed::compliance(outcome.checks, sla_checks);
            mixed = Some(outcome.report);
            (outcome.both, compliance)
        }
        Mode::Streams { streams: s, .. } => {
            let outcome = run_streams(&common, &s, &params).await?;
            streams = Some(outcome.report);
            (outcome.result, outcome.compliance)
        }
    };
    let report = Report {
        schema: SCHEMA.to_owned(),
        tool: format!("tickserve {}", env!("CARGO_PKG_VERSION")),
        mode: mode_name.to_owned(),
        started_unix_s,
        target: common.url.clone(),
        settings,
        result,
        sla,
        compliance,
        stress,
        compare,
        mixed,
        streams,
    };
    write_outputs(&common, &report)?;
    let exit_code = crate::sla::exit_code(&report.compliance);
    Ok(Finished { report, exit_code })
}

fn write_outputs(c: &Common, report: &Report) -> Result<(), BenchError> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text)
            .map_err(|e| BenchError::Config(format!("cannot write {}: {e}", path.display())))
    };
    if let Some(p) = &c.json {
        write(p, report.to_json())?;
    }
    if let Some(p) = &c.html {
        write(p, report.to_html())?;
    }
    match c.format {
        Format::Text => println!("{}", report.to_text()),
        Format::Json => println!("{}", report.to_json()),
        Format::None => {}
    }
    Ok(())
}

fn judge(m: Measured, sla: &Sla) -> (RunStats, Compliance) {
    let stats = m.recorder.summarise(m.elapsed, &sla.goodput_limits());
    let compliance = evaluate(&stats, sla);
    (stats, compliance)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn params_parse_as_json_or_strings() {
        let p = parse_params(&["cache=false".into(), "tag=abc".into(), "n=3".into()]).unwrap();
        assert_eq!(p["cache"], serde_json::Value::Bool(false));
        assert_eq!(p["tag"], "abc");
        assert_eq!(p["n"], 3);
        assert!(parse_params(&["nokey".into()]).is_err());
    }

    #[test]
    fn targets_parse_with_none_and_refuse_bad_priorities() {
        let t = parse_targets(&["1=2ms".into(), "2=5ms".into(), "2=none".into()]).unwrap();
        assert_eq!(t, BTreeMap::from([(1, Duration::from_millis(2))]));
        assert!(parse_targets(&["6=1ms".into()]).is_err());
        assert!(parse_targets(&["1=soon".into()]).is_err());
        assert!(parse_targets(&["1".into()]).is_err());
    }
}
