//! One driver per `tickserve bench` mode (load, rate, stress, compare,
//! mixed): each runs its measurements through `crate::run`, judges them
//! against the SLA and builds the [`Report`] that [`super::run`] writes.

use super::*;

/// The limits of a run of `duration` and at most `max_requests`, and its
/// progress bar.
fn timed(c: &Common, label: &str, duration: Duration, max_requests: u64) -> (Limits, Progress) {
    let limits = Limits {
        duration: Some(duration),
        count: Some(max_requests),
    };
    (limits, Progress::new(!c.quiet, label, limits))
}

pub(super) async fn run_load(
    t: &Target,
    w: Arc<Workload>,
    concurrency: usize,
    duration: Duration,
    max_requests: u64,
    c: &Common,
) -> Measured {
    let (limits, progress) = timed(c, &format!("load c={concurrency}"), duration, max_requests);
    let m = closed_loop(t, w, concurrency, limits, c.warmup, &progress).await;
    progress.finish();
    m
}

pub(super) async fn run_rate(
    t: &Target,
    w: Arc<Workload>,
    open: OpenLoop,
    duration: Duration,
    max_requests: u64,
    c: &Common,
) -> Measured {
    let (limits, progress) = timed(c, &format!("rate {}/s", open.rate), duration, max_requests);
    let m = open_loop(t, w, open, limits, c.warmup, &progress).await;
    progress.finish();
    m
}

pub(super) async fn run_stress(
    c: &Common,
    s: &StressArgs,
    params: serde_json::Map<String, serde_json::Value>,
    sla: &Sla,
) -> Result<StressReport, BenchError> {
    if s.step <= 0.0 || s.start <= 0.0 {
        return Err(BenchError::Config(
            "--start and --step must be positive".into(),
        ));
    }
    let w = workload(c, params)?;
    let by = match s.by {
        StressBy::Concurrency => "concurrency",
        StressBy::Rate => "rate",
    };
    let connections = match s.by {
        StressBy::Concurrency => s.max as usize,
        StressBy::Rate => s.max_in_flight,
    };
    let t = target(c, &c.url, connections)?;
    let mut steps = Vec::new();
    let mut stopped_because = format!("reached --max {}", s.max);
    let mut level = s.start;
    let mut first = true;
    while level <= s.max + 1e-9 {
        // Warm up only before the first step; later steps follow a loaded
        // server anyway.
        let mut step_common = c.clone();
        if !first {
            step_common.warmup = 0;
        }
        first = false;
        let m = match s.by {
            StressBy::Concurrency => {
                run_load(
                    &t,
                    w.clone(),
                    level as usize,
                    s.step_duration,
                    u64::MAX,
                    &step_common,
                )
                .await
            }
            StressBy::Rate => {
                let open = OpenLoop {
                    rate: level,
                    arrival: s.arrival,
                    max_in_flight: s.max_in_flight,
                    late_threshold: Duration::from_millis(5),
                    seed: c.seed,
                };
                run_rate(&t, w.clone(), open, s.step_duration, u64::MAX, &step_common).await
            }
        };
        let (stats, compliance) = judge(m, sla);
        let err = stats.overall.error_rate;
        let p99 = stats.overall.latency_ms.p99;
        let stop_p99 = s.stop_p99.as_secs_f64() * 1000.0;
        if !c.quiet {
            eprintln!(
                "step {by} {level}: {:.1} req/s, p99 {p99:.1} ms, errors {:.2}%, SLA {}",
                stats.overall.throughput_rps,
                err * 100.0,
                if compliance.compliant {
                    "met"
                } else {
                    "missed"
                }
            );
        }
        steps.push(StressStep {
            level,
            stats,
            compliance,
        });
        if err > s.stop_error_rate {
            stopped_because = format!(
                "error rate {:.2}% passed {:.2}% at {by} {level}",
                err * 100.0,
                s.stop_error_rate * 100.0
            );
            break;
        }
        if p99 > stop_p99 {
            stopped_because = format!("p99 {p99:.1} ms passed {stop_p99} ms at {by} {level}");
            break;
        }
        level += s.step;
    }
    let last_compliant_level = steps
        .iter()
        .rev()
        .find(|st| st.compliance.compliant)
        .map(|st| st.level);
    Ok(StressReport {
        by: by.to_owned(),
        steps,
        stopped_because,
        last_compliant_level,
    })
}

pub(super) async fn run_compare(
    c: &Common,
    a: &CompareArgs,
    baseline_params: serde_json::Map<String, serde_json::Value>,
) -> Result<CompareReport, BenchError> {
    let candidate_url = a.candidate_url.clone().unwrap_or_else(|| c.url.clone());
    let candidate_params = parse_params(&a.candidate_params)?;
    let describe = |url: &str, p: &serde_json::Map<String, serde_json::Value>| {
        if p.is_empty() {
            url.to_owned()
        } else {
            format!(
                "{url} with parameters {}",
                serde_json::Value::Object(p.clone())
            )
        }
    };
    let sides = [
        (
            describe(&c.url, &baseline_params),
            target(c, &c.url, a.concurrency)?,
            workload(c, baseline_params)?,
        ),
        (
            describe(&candidate_url, &candidate_params),
            target(c, &candidate_url, a.concurrency)?,
            workload(c, candidate_params)?,
        ),
    ];
    let limits = Sla::default().goodput_limits();
    let mut runs: [Vec<RunStats>; 2] = [Vec::new(), Vec::new()];
    for r in 0..a.repeats.max(1) {
        // Alternate the order so drift in the machine's load does not
        // favour one side.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (_, t, w) = &sides[side];
            let m = match a.workload {
                CompareWorkload::Latency => {
                    let limits = Limits {
                        duration: None,
                        count: Some(a.requests),
                    };
                    let p = Progress::new(!c.quiet, "compare", limits);
                    let m = closed_loop(t, w.clone(), 1, limits, c.warmup, &p).await;
                    p.finish();
                    m
                }
                CompareWorkload::Load => {
                    run_load(t, w.clone(), a.concurrency, a.duration, u64::MAX, c).await
                }
                CompareWorkload::Rate => {
                    let open = OpenLoop {
                        rate: a.rate,
                        arrival: Arrival::Constant,
                        max_in_flight: 1024,
                        late_threshold: Duration::from_millis(5),
                        seed: c.seed,
                    };
                    run_rate(t, w.clone(), open, a.duration, u64::MAX, c).await
                }
            };
            runs[side].push(m.recorder.summarise(m.elapsed, &limits));
        }
    }
    let [baseline_runs, candidate_runs] = runs;
    // A metric's value in one run.
    type Value = fn(&RunStats) -> f64;
    let pick = |runs: &[RunStats], f: Value| runs.iter().map(f).collect::<Vec<_>>();
    // Metric, its value, whether higher is better.
    let metrics: [(&str, Value, bool); 4] = [
        ("throughput rps", |r| r.overall.throughput_rps, true),
        ("mean ms", |r| r.overall.latency_ms.mean, false),
        ("p50 ms", |r| r.overall.latency_ms.median, false),
        ("p99 ms", |r| r.overall.latency_ms.p99, false),
    ];
    let improvements = metrics
        .into_iter()
        .map(|(metric, value, higher_is_better)| {
            improvement(
                metric,
                pick(&baseline_runs, value),
                pick(&candidate_runs, value),
                higher_is_better,
            )
        })
        .collect();
    let [(baseline, _, _), (candidate, _, _)] = sides;
    Ok(CompareReport {
        baseline,
        candidate,
        repeats: a.repeats.max(1),
        workload: format!("{:?}", a.workload).to_lowercase(),
        improvements,
        baseline_runs,
        candidate_runs,
    })
}

pub(super) async fn run_mixed(
    c: &Common,
    m: &MixedArgs,
    params: serde_json::Map<String, serde_json::Value>,
) -> Result<crate::mixed::MixedOutcome, BenchError> {
    if c.priorities.is_some() {
        return Err(BenchError::Config(
            "bench mixed sets each class's priority: use --fg-priority and --bg-priority, not --priorities".into(),
        ));
    }
    if m.fg_priority == m.bg_priority {
        return Err(BenchError::Config(format!(
            "--fg-priority and --bg-priority are both {}: the classes must differ",
            m.fg_priority
        )));
    }
    if m.fg_rate.is_nan() || m.fg_rate <= 0.0 {
        return Err(BenchError::Config("--fg-rate must be positive".into()));
    }
    let plan = MixedPlan {
        fg_priority: m.fg_priority,
        fg_rate: m.fg_rate,
        fg_arrival: m.fg_arrival,
        fg_max_in_flight: m.max_in_flight,
        late_threshold: m.late_threshold,
        bg_priority: m.bg_priority,
        bg_concurrency: m.bg_concurrency.max(1),
        bg_rows: m.bg_rows.unwrap_or_else(|| {
            c.shape
                .as_ref()
                .and_then(|s| s.first().copied())
                .unwrap_or(1)
        }),
        durations: m
            .phase
            .map_or([m.fg_duration, m.bg_duration, m.both_duration], |d| [d; 3]),
        targets: parse_targets(&m.target_latency)?,
        goals: MixedGoals {
            max_fg_p99_ms: m.goal_fg_p99.as_secs_f64() * 1000.0,
            max_fg_p99_ratio: m.goal_fg_p99_ratio,
            min_bg_throughput_ratio: m.goal_bg_throughput_ratio,
        },
        warmup: c.warmup,
        show_progress: !c.quiet,
    };
    let fg_spec = workload(c, params)?.spec().clone();
    let fg_target = target_at(
        c,
        m.fg_url.as_deref().unwrap_or(&c.url),
        m.fg_grpc_url.as_deref().unwrap_or(&c.grpc_url),
        m.max_in_flight,
    )?;
    let bg_target = target(c, &c.url, plan.bg_concurrency)?;
    crate::mixed::run_mixed(&fg_target, &bg_target, &fg_spec, &plan).await
}

/// `PRIORITY=DURATION` or `PRIORITY=none`, e.g. `1=2ms`.
pub(super) fn parse_targets(items: &[String]) -> Result<BTreeMap<u8, Duration>, BenchError> {
    let mut targets = BTreeMap::new();
    for item in items {
        let bad = |why: &str| BenchError::Config(format!("--target-latency `{item}`: {why}"));
        let (p, d) = item
            .split_once('=')
            .ok_or_else(|| bad("expected PRIORITY=DURATION, e.g. 1=2ms"))?;
        let p: u8 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| (1..=5).contains(p))
            .ok_or_else(|| bad("the priority must be 1-5"))?;
        match d.trim() {
            "none" => {
                targets.remove(&p);
            }
            d => {
                targets.insert(p, parse_duration(d).map_err(|e| bad(&e))?);
            }
        }
    }
    Ok(targets)
}

pub(super) async fn run_streams(
    c: &Common,
    s: &crate::streams::StreamsArgs,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<crate::streams::StreamsOutcome, BenchError> {
    if c.protocol != Protocol::HttpJson {
        return Err(BenchError::Config(
            "bench streams sends HTTP JSON (the goal is about the JSON a client sends): drop --protocol".into(),
        ));
    }
    let shape = c.shape.clone().unwrap_or_else(|| DEFAULT_SHAPE.to_vec());
    let [_, rows, features] = shape[..] else {
        return Err(BenchError::Config(format!(
            "bench streams needs a model input of shape [1, T, F], not {shape:?}"
        )));
    };
    let parameters = serde_json::Value::Object(params.clone()).to_string();
    let target = crate::streams::StreamsTarget {
        infer_url: target(c, &c.url, s.concurrency)?.infer_url().to_owned(),
        input_name: c.input_name.clone(),
        rows,
        features,
        parameters: parameters[1..parameters.len() - 1].to_owned(),
        seed: c.seed,
        timeout: c.timeout,
    };
    crate::streams::run_streams(&target, s).await
}
