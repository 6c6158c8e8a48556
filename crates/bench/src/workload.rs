//! What the load generator sends: OIP requests built from input rows
//! (random with a seed, or read from a .npy / JSON file), a share of
//! repeated inputs (the cache workload) and a priority mix, in one of the
//! server's wire formats ([`Protocol`]): JSON over HTTP, Triton's
//! binary-tensor extension over HTTP, or gRPC with raw input contents.
//!
//! Bodies are serialised ahead of time from a pool of base rows, so the
//! client spends its CPU on sending, not on formatting floats. A "fresh"
//! request differs from every other one: its first input value is replaced
//! by a value unique to its sequence number. A "repeated" request is one of
//! a small hot set of base rows, byte for byte.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::BenchError;
use crate::proto as pb;

/// The share of traffic sent at each priority, e.g. `1:10,3:60,5:30`.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityMix {
    /// (priority, weight); weights need not sum to 100.
    pub weights: Vec<(u8, u32)>,
}

impl std::str::FromStr for PriorityMix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut weights = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (p, w) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}`: expected PRIORITY:WEIGHT, e.g. 1:10"))?;
            let p: u8 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{p}`: priority must be a number 1-5"))?;
            if !(1..=5).contains(&p) {
                return Err(format!("priority {p} is outside 1-5"));
            }
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("`{w}`: weight must be a whole number"))?;
            weights.push((p, w));
        }
        if weights.iter().map(|&(_, w)| w as u64).sum::<u64>() == 0 {
            return Err("the priority mix needs at least one positive weight".into());
        }
        Ok(Self { weights })
    }
}

impl serde::Serialize for PriorityMix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = self
            .weights
            .iter()
            .map(|(p, w)| format!("{p}:{w}"))
            .collect();
        s.serialize_str(&text.join(","))
    }
}

impl PriorityMix {
    /// The priority for a uniform draw `u` in [0, 1).
    pub fn pick(&self, u: f64) -> u8 {
        let total: u64 = self.weights.iter().map(|&(_, w)| w as u64).sum();
        let mut target = u * total as f64;
        for &(p, w) in &self.weights {
            if target < w as f64 {
                return p;
            }
            target -= w as f64;
        }
        self.weights.last().map_or(1, |&(p, _)| p)
    }
}

/// The wire format of the requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// JSON body over HTTP (`data` arrays).
    #[default]
    HttpJson,
    /// Triton's binary-tensor extension over HTTP: a JSON header, then the
    /// input as little-endian bytes (`Inference-Header-Content-Length`).
    HttpBinary,
    /// gRPC `ModelInfer` with `raw_input_contents`.
    Grpc,
}

/// Where input rows come from.
#[derive(Debug, Clone)]
pub enum InputSource {
    /// Uniform in [-1, 1) from a seeded generator.
    Random,
    /// Rows of a .npy file (float32 or float64) or a JSON array of rows
    /// (flat or nested), each of the request's per-row size.
    File(PathBuf),
}

/// Settings of the request stream.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub model: String,
    pub input_name: String,
    /// Full shape including the batch dimension, e.g. `[1, 50, 60]`.
    pub shape: Vec<usize>,
    pub datatype: String,
    pub source: InputSource,
    pub seed: u64,
    /// Share (0..=1) of requests that repeat one of the hot inputs.
    pub repeat_fraction: f64,
    /// How many distinct hot inputs the repeated requests cycle over.
    pub hot_set: usize,
    pub priorities: Option<PriorityMix>,
    /// Extra request-level `parameters` (JSON object members).
    pub parameters: serde_json::Map<String, serde_json::Value>,
    pub protocol: Protocol,
}

/// One ready-to-send request in its wire format.
#[derive(Debug)]
pub enum Payload {
    /// An HTTP JSON body.
    Json(reqwest::Body),
    /// An HTTP binary-tensor body: a JSON header of `header_len` bytes,
    /// then the tensor bytes.
    Binary {
        body: reqwest::Body,
        header_len: usize,
    },
    /// A gRPC request.
    Grpc(Box<pb::ModelInferRequest>),
}

/// One ready-to-send request.
#[derive(Debug)]
pub struct Request {
    pub payload: Payload,
    pub priority: Option<u8>,
}

/// A pre-built request stream; `request(seq)` is cheap and deterministic.
#[derive(Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    /// Per priority slot (index 0 = none): serialised bodies of the hot
    /// rows, and the head/tail split of the fresh template.
    hot: Vec<Vec<bytes_body::Bytes>>,
    fresh: Vec<(String, String)>,
    /// Binary and gRPC: the base rows (the last one is the fresh template)
    /// and, per priority slot, the binary header or the gRPC request
    /// without its data.
    rows: Vec<Vec<f32>>,
    binary_headers: Vec<String>,
    grpc: Vec<pb::ModelInferRequest>,
    rng_seed: u64,
}

mod bytes_body {
    /// Bodies are shared between requests without copying.
    pub type Bytes = std::sync::Arc<[u8]>;
}

impl Workload {
    pub fn new(spec: WorkloadSpec) -> Result<Self, BenchError> {
        if !(0.0..=1.0).contains(&spec.repeat_fraction) {
            return Err(BenchError::Config(format!(
                "--repeat-fraction {} is outside 0..1",
                spec.repeat_fraction
            )));
        }
        let batch = spec.shape.first().copied().unwrap_or(1).max(1);
        let row: usize = spec.shape.iter().skip(1).product::<usize>().max(1);
        let per_request = batch * row;
        let hot_n = spec.hot_set.max(1);
        let rows: Vec<Vec<f32>> = match &spec.source {
            InputSource::Random => {
                let mut rng = StdRng::seed_from_u64(spec.seed);
                (0..hot_n + 1)
                    .map(|_| {
                        (0..per_request)
                            .map(|_| rng.random_range(-1.0f32..1.0))
                            .collect()
                    })
                    .collect()
            }
            InputSource::File(path) => {
                let values = read_rows(path)?;
                if values.is_empty() || values.len() % per_request != 0 {
                    return Err(BenchError::Config(format!(
                        "{}: {} values are not a whole number of requests of shape {:?} ({} values each)",
                        path.display(),
                        values.len(),
                        spec.shape,
                        per_request
                    )));
                }
                values.chunks(per_request).map(<[f32]>::to_vec).collect()
            }
        };
        let slots: Vec<Option<u8>> = std::iter::once(None).chain((1..=5).map(Some)).collect();
        let mut hot = Vec::new();
        let mut fresh = Vec::new();
        let binary_headers = slots
            .iter()
            .map(|&p| binary_header(&spec, p, per_request * 4))
            .collect();
        let grpc = slots.iter().map(|&p| grpc_request(&spec, p)).collect();
        for priority in slots {
            let bodies = (0..hot_n)
                .map(|i| {
                    let r = &rows[i % rows.len()];
                    let (head, tail) = template(&spec, priority, r);
                    let mut s = head;
                    s.push_str(&json_f32(r[0]));
                    s.push_str(&tail);
                    bytes_body::Bytes::from(s.into_bytes())
                })
                .collect();
            hot.push(bodies);
            // Fresh requests start from the last pool row.
            fresh.push(template(&spec, priority, &rows[rows.len() - 1]));
        }
        Ok(Self {
            rng_seed: spec.seed,
            spec,
            hot,
            fresh,
            rows,
            binary_headers,
            grpc,
        })
    }

    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// The `seq`-th request of the stream.
    pub fn request(&self, seq: u64) -> Request {
        let mut rng =
            StdRng::seed_from_u64(self.rng_seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let priority = self
            .spec
            .priorities
            .as_ref()
            .map(|m| m.pick(rng.random::<f64>()));
        let slot = priority.map_or(0, usize::from);
        let repeated = rng.random::<f64>() < self.spec.repeat_fraction;
        let hot_index = rng.random_range(0..self.hot[slot].len());
        // A value no other request has: unique per sequence number (exact
        // in f32 up to 2^24 requests, then it wraps).
        let unique = (seq % (1 << 24)) as f32 / (1u32 << 24) as f32;
        let payload = match self.spec.protocol {
            Protocol::HttpJson if repeated => {
                Payload::Json(reqwest::Body::from(self.hot[slot][hot_index].to_vec()))
            }
            Protocol::HttpJson => {
                let (head, tail) = &self.fresh[slot];
                let mut s = String::with_capacity(head.len() + tail.len() + 16);
                s.push_str(head);
                s.push_str(&json_f32(unique));
                s.push_str(tail);
                Payload::Json(reqwest::Body::from(s))
            }
            Protocol::HttpBinary | Protocol::Grpc => {
                let (row, first) = if repeated {
                    let row = &self.rows[hot_index % self.rows.len()];
                    (row, row[0])
                } else {
                    (&self.rows[self.rows.len() - 1], unique)
                };
                let mut bytes = Vec::with_capacity(row.len() * 4);
                bytes.extend_from_slice(&first.to_le_bytes());
                for v in &row[1..] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                if self.spec.protocol == Protocol::Grpc {
                    let mut r = self.grpc[slot].clone();
                    r.raw_input_contents = vec![bytes];
                    Payload::Grpc(Box::new(r))
                } else {
                    let header = &self.binary_headers[slot];
                    let mut body = Vec::with_capacity(header.len() + bytes.len());
                    body.extend_from_slice(header.as_bytes());
                    body.extend_from_slice(&bytes);
                    Payload::Binary {
                        body: reqwest::Body::from(body),
                        header_len: header.len(),
                    }
                }
            }
        };
        Request { payload, priority }
    }
}

/// The request-level parameters of a slot: the extra ones and the priority.
fn parameters(
    spec: &WorkloadSpec,
    priority: Option<u8>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut params = spec.parameters.clone();
    if let Some(p) = priority {
        params.insert("priority".into(), serde_json::Value::from(p));
    }
    params
}

/// The JSON header of a binary-tensor request carrying `bytes` of input.
fn binary_header(spec: &WorkloadSpec, priority: Option<u8>, bytes: usize) -> String {
    let params = parameters(spec, priority);
    let mut header = serde_json::json!({
        "inputs": [{
            "name": spec.input_name,
            "shape": spec.shape,
            "datatype": spec.datatype,
            "parameters": {"binary_data_size": bytes},
        }],
    });
    if !params.is_empty() {
        header["parameters"] = serde_json::Value::Object(params);
    }
    header.to_string()
}

/// A gRPC request without its input bytes.
fn grpc_request(spec: &WorkloadSpec, priority: Option<u8>) -> pb::ModelInferRequest {
    use pb::infer_parameter::ParameterChoice;
    let parameters = parameters(spec, priority)
        .into_iter()
        .map(|(k, v)| {
            let choice = match v {
                serde_json::Value::Bool(b) => ParameterChoice::BoolParam(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => ParameterChoice::Int64Param(i),
                    None => ParameterChoice::DoubleParam(n.as_f64().unwrap_or(0.0)),
                },
                serde_json::Value::String(s) => ParameterChoice::StringParam(s),
                other => ParameterChoice::StringParam(other.to_string()),
            };
            (
                k,
                pb::InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect();
    pb::ModelInferRequest {
        model_name: spec.model.clone(),
        parameters,
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: spec.input_name.clone(),
            datatype: spec.datatype.clone(),
            shape: spec.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The body up to (not including) the first data value, and after it.
fn template(spec: &WorkloadSpec, priority: Option<u8>, row: &[f32]) -> (String, String) {
    let params = parameters(spec, priority);
    let mut head = String::from("{");
    if !params.is_empty() {
        head.push_str("\"parameters\":");
        head.push_str(&serde_json::Value::Object(params).to_string());
        head.push(',');
    }
    head.push_str("\"inputs\":[{\"name\":");
    head.push_str(&serde_json::Value::from(spec.input_name.as_str()).to_string());
    head.push_str(",\"shape\":");
    head.push_str(&serde_json::Value::from(spec.shape.clone()).to_string());
    head.push_str(",\"datatype\":");
    head.push_str(&serde_json::Value::from(spec.datatype.as_str()).to_string());
    head.push_str(",\"data\":[");
    let mut tail = String::with_capacity(row.len() * 12);
    for v in &row[1..] {
        tail.push(',');
        tail.push_str(&json_f32(*v));
    }
    tail.push_str("]}]}");
    (head, tail)
}

fn json_f32(v: f32) -> String {
    if v.is_finite() {
        // Shortest text that reads back as the same f32.
        format!("{v:?}")
    } else {
        "0.0".to_owned()
    }
}

fn read_rows(path: &Path) -> Result<Vec<f32>, BenchError> {
    let io = |e: std::io::Error| BenchError::Config(format!("cannot read {}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(io)?;
    let bad = |e: String| BenchError::Config(format!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "npy") {
        let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(e.to_string()))?;
        let dtype = npy.dtype().descr();
        if dtype.ends_with("f8") {
            let v: Vec<f64> = npy.into_vec().map_err(|e| bad(e.to_string()))?;
            Ok(v.into_iter().map(|x| x as f32).collect())
        } else {
            npy.into_vec::<f32>().map_err(|e| bad(e.to_string()))
        }
    } else {
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut out = Vec::new();
        flatten(&value, &mut out).map_err(bad)?;
        Ok(out)
    }
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) -> Result<(), String> {
    match v {
        serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out)),
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(0.0) as f32);
            Ok(())
        }
        other => Err(format!("expected numbers in nested arrays, found {other}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            model: "m".into(),
            input_name: "input".into(),
            shape: vec![1, 2, 3],
            datatype: "FP32".into(),
            source: InputSource::Random,
            seed: 7,
            repeat_fraction: 0.0,
            hot_set: 4,
            priorities: None,
            parameters: serde_json::Map::new(),
            protocol: Protocol::HttpJson,
        }
    }

    fn body(w: &Workload, seq: u64) -> serde_json::Value {
        let Payload::Json(body) = w.request(seq).payload else {
            panic!("not a JSON request")
        };
        serde_json::from_slice(body.as_bytes().unwrap()).unwrap()
    }

    /// The input values of JSON request `seq`.
    fn data_of(w: &Workload, seq: u64) -> Vec<f32> {
        body(w, seq)["inputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    }

    #[test]
    fn priority_mix_parses_and_picks_by_weight() {
        let m: PriorityMix = "1:10,3:60,5:30".parse().unwrap();
        assert_eq!(m.pick(0.0), 1);
        assert_eq!(m.pick(0.099), 1);
        assert_eq!(m.pick(0.1), 3);
        assert_eq!(m.pick(0.69), 3);
        assert_eq!(m.pick(0.7), 5);
        assert_eq!(m.pick(0.9999), 5);
        assert!("0:10".parse::<PriorityMix>().is_err());
        assert!("1:0".parse::<PriorityMix>().is_err());
        assert!("1-10".parse::<PriorityMix>().is_err());
    }

    #[test]
    fn fresh_requests_are_all_distinct_and_well_formed() {
        let w = Workload::new(spec()).unwrap();
        let a = body(&w, 1);
        let b = body(&w, 2);
        assert_eq!(a["inputs"][0]["shape"], serde_json::json!([1, 2, 3]));
        assert_eq!(a["inputs"][0]["data"].as_array().unwrap().len(), 6);
        assert_ne!(a, b);
        assert!(a.get("parameters").is_none());
    }

    #[test]
    fn repeated_requests_come_from_the_hot_set_and_carry_priorities() {
        let mut s = spec();
        s.repeat_fraction = 1.0;
        s.priorities = Some("2:1".parse().unwrap());
        s.parameters
            .insert("cache".into(), serde_json::Value::Bool(false));
        let w = Workload::new(s).unwrap();
        let distinct: std::collections::HashSet<String> =
            (0..200).map(|i| body(&w, i).to_string()).collect();
        assert_eq!(distinct.len(), 4);
        let b = body(&w, 3);
        assert_eq!(b["parameters"]["priority"], 2);
        assert_eq!(b["parameters"]["cache"], false);
        assert_eq!(w.request(3).priority, Some(2));
    }

    #[test]
    fn rows_come_from_a_npy_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/golden/cnn_lstm/input.npy");
        let bytes = std::fs::read(&path).unwrap();
        let first: Vec<f32> = npyz::NpyFile::new(&bytes[..])
            .unwrap()
            .into_vec::<f32>()
            .unwrap()[..3000]
            .to_vec();
        let mut s = spec();
        s.shape = vec![1, 50, 60];
        s.source = InputSource::File(path);
        s.repeat_fraction = 1.0;
        s.hot_set = 1;
        let w = Workload::new(s).unwrap();
        let data: Vec<f32> = data_of(&w, 0);
        assert_eq!(data, first);
    }

    #[test]
    fn rows_come_from_a_json_file() {
        let dir = tickserve_test_support::fresh_dir("tickserve-bench-wl");
        let path = dir.join("rows.json");
        std::fs::write(&path, "[[[1,2,3],[4,5,6]],[[7,8,9],[10,11,12]]]").unwrap();
        let mut s = spec();
        s.source = InputSource::File(path.clone());
        s.repeat_fraction = 1.0;
        s.hot_set = 2;
        let w = Workload::new(s.clone()).unwrap();
        let seen: std::collections::HashSet<String> = (0..50)
            .map(|i| body(&w, i)["inputs"][0]["data"].to_string())
            .collect();
        assert!(seen.contains("[1.0,2.0,3.0,4.0,5.0,6.0]"), "{seen:?}");
        assert!(seen.contains("[7.0,8.0,9.0,10.0,11.0,12.0]"), "{seen:?}");
        std::fs::write(&path, "[1,2,3,4,5]").unwrap();
        assert!(Workload::new(s).is_err());
    }

    #[test]
    fn binary_and_grpc_requests_carry_the_same_rows_as_json() {
        let mut s = spec();
        s.priorities = Some("3:1".parse().unwrap());
        let json = Workload::new(s.clone()).unwrap();
        let want: Vec<f32> = data_of(&json, 9);
        let le = |bytes: &[u8]| -> Vec<f32> {
            bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };

        s.protocol = Protocol::HttpBinary;
        let Payload::Binary { body, header_len } =
            Workload::new(s.clone()).unwrap().request(9).payload
        else {
            panic!("not binary")
        };
        let bytes = body.as_bytes().unwrap();
        let header: serde_json::Value = serde_json::from_slice(&bytes[..header_len]).unwrap();
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 24);
        assert_eq!(header["parameters"]["priority"], 3);
        assert!(header["inputs"][0].get("data").is_none());
        assert_eq!(le(&bytes[header_len..]), want);

        s.protocol = Protocol::Grpc;
        s.parameters
            .insert("cache".into(), serde_json::Value::Bool(false));
        let Payload::Grpc(r) = Workload::new(s).unwrap().request(9).payload else {
            panic!("not gRPC")
        };
        assert_eq!(r.model_name, "m");
        assert_eq!(r.inputs[0].shape, vec![1, 2, 3]);
        assert_eq!(le(&r.raw_input_contents[0]), want);
        use pb::infer_parameter::ParameterChoice;
        assert_eq!(
            r.parameters["priority"].parameter_choice,
            Some(ParameterChoice::Int64Param(3))
        );
        assert_eq!(
            r.parameters["cache"].parameter_choice,
            Some(ParameterChoice::BoolParam(false))
        );
    }
}
