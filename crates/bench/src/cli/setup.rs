//! What every mode does before it measures: the workload and target built
//! from [`Common`], the input name/shape read from the model's metadata when
//! not given, the SLA file, and the settings recorded in the report.

use super::*;

pub(super) fn parse_params(
    params: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, BenchError> {
    let mut map = serde_json::Map::new();
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| BenchError::Config(format!("--param `{p}`: expected KEY=JSON")))?;
        // A bare word that is not JSON is taken as a string.
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::from(v));
        map.insert(k.to_owned(), value);
    }
    Ok(map)
}

pub(super) fn workload(
    c: &Common,
    params: serde_json::Map<String, serde_json::Value>,
) -> Result<Arc<Workload>, BenchError> {
    Ok(Arc::new(Workload::new(WorkloadSpec {
        model: c.model.clone(),
        input_name: c.input_name.clone(),
        shape: c.shape.clone().unwrap_or_else(|| DEFAULT_SHAPE.to_vec()),
        datatype: c.datatype.clone(),
        source: c
            .input_file
            .clone()
            .map_or(InputSource::Random, InputSource::File),
        seed: c.seed,
        repeat_fraction: c.repeat_fraction,
        hot_set: c.hot_set,
        priorities: c.priorities.clone(),
        parameters: params,
        protocol: c.protocol,
    })?))
}

pub(super) fn target(c: &Common, url: &str, connections: usize) -> Result<Target, BenchError> {
    target_at(c, url, &c.grpc_url, connections)
}

/// As [`target`], with gRPC at `grpc_url` instead of `--grpc-url`.
pub(super) fn target_at(
    c: &Common,
    url: &str,
    grpc_url: &str,
    connections: usize,
) -> Result<Target, BenchError> {
    Target::new(
        url,
        &c.model,
        c.model_version.as_deref(),
        c.timeout,
        connections,
        (c.protocol == Protocol::Grpc).then_some(grpc_url),
    )
}

/// The first input of the model's metadata (`GET /v2/models/{m}`): name,
/// datatype and shape with a batch of 1 for the variable (`-1`) axes.
pub(super) async fn input_from_metadata(
    c: &Common,
) -> Result<(String, String, Vec<usize>), String> {
    let base = c.url.trim_end_matches('/');
    let url = match &c.model_version {
        Some(v) => format!("{base}/v2/models/{}/versions/{v}", c.model),
        None => format!("{base}/v2/models/{}", c.model),
    };
    let response = reqwest::Client::builder()
        .timeout(c.timeout)
        .build()
        .map_err(|e| e.to_string())?
        .get(&url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url}: http {}", response.status().as_u16()));
    }
    let meta: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    let inputs = meta["inputs"].as_array().cloned().unwrap_or_default();
    let input = inputs
        .iter()
        .find(|i| i["name"] == c.input_name.as_str())
        .or(inputs.first())
        .ok_or_else(|| format!("{url}: no inputs in the metadata"))?;
    let shape = input["shape"]
        .as_array()
        .ok_or_else(|| format!("{url}: input without a shape"))?
        .iter()
        .map(|d| match d.as_i64() {
            Some(d) if d > 0 => Ok(d as usize),
            Some(_) => Ok(1),
            None => Err(format!("{url}: shape entry {d} is not a number")),
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let name = input["name"].as_str().unwrap_or(&c.input_name).to_owned();
    let datatype = input["datatype"].as_str().unwrap_or(&c.datatype).to_owned();
    Ok((name, datatype, shape))
}

/// Fills in `--shape` (and the input's name and datatype) from the
/// model's metadata when `--shape` was not given.
pub(super) async fn resolve_input(mut c: Common) -> Common {
    if c.shape.is_some() {
        return c;
    }
    match input_from_metadata(&c).await {
        Ok((name, datatype, shape)) => {
            if !c.quiet {
                eprintln!("input from the model's metadata: {name} {datatype} {shape:?}");
            }
            c.input_name = name;
            c.datatype = datatype;
            c.shape = Some(shape);
        }
        Err(e) => {
            if !c.quiet {
                eprintln!("cannot read the model's metadata ({e}); input shape {DEFAULT_SHAPE:?}");
            }
            c.shape = Some(DEFAULT_SHAPE.to_vec());
        }
    }
    c
}

pub(super) fn load_sla(c: &Common) -> Result<Sla, BenchError> {
    match &c.sla {
        None => Ok(Sla::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BenchError::Config(format!("cannot read SLA file {}: {e}", path.display()))
            })?;
            Sla::parse(&text).map_err(|e| {
                BenchError::Config(format!("invalid SLA file {}: {e}", path.display()))
            })
        }
    }
}

pub(super) fn settings_json(mode: &Mode) -> serde_json::Value {
    serde_json::to_value(mode).unwrap_or(serde_json::Value::Null)
}
