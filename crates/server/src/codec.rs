//! The HTTP wire formats: the JSON request and answer structures, and the
//! forms other than plain JSON: Triton's binary-tensor extension
//! (including the raw single-input form), MessagePack bodies, and gzip/deflate compression (serving-systems.md §6).
//!
//! [`decode_request`] picks the form from the headers
//! (`Inference-Header-Content-Length`, `Content-Type`), decodes into the
//! same [`RequestJson`] structure the JSON path uses and hands it to
//! [`request_from_wire`]; it also records in [`Answer`] how the
//! client wants the answer (binary outputs, MessagePack via `Accept`).
//! Compression is done by tower-http layers before and after the handlers,
//! so every route, not only inference, honours `Content-Encoding` and
//! `Accept-Encoding`; the body limit applies to the decompressed size.

use std::fmt;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;

use crate::error::ServeError;
use crate::json_numbers;
use crate::models::{InferRequest, InferResponse, InputTensor, ModelVersion};
use crate::scheduling::{self, Param};

/// Header giving the length of the JSON header of a binary-tensor body.
pub const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// Protocol extensions listed by `GET /v2` and gRPC ServerMetadata.
pub const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "model_configuration", "statistics"];

const MSGPACK: &str = "application/msgpack";

pub(crate) fn decompression_layer() -> RequestDecompressionLayer {
    RequestDecompressionLayer::new()
}

pub(crate) fn compression_layer() -> CompressionLayer {
    CompressionLayer::new()
}

/// Which outputs go as raw bytes after the JSON header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum BinaryOutputs {
    #[default]
    None,
    All,
    Named(Vec<String>),
}

/// How to encode the answer, decided from the request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    msgpack: bool,
    binary: BinaryOutputs,
}

fn is_msgpack(value: Option<&HeaderValue>) -> bool {
    value.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|part| {
            let mime = part.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case(MSGPACK)
                || mime.eq_ignore_ascii_case("application/x-msgpack")
                || mime.eq_ignore_ascii_case("application/vnd.msgpack")
        })
    })
}

impl Answer {
    /// MessagePack when `Accept` names it, JSON otherwise.
    pub(crate) fn from_accept(headers: &HeaderMap) -> Self {
        Answer {
            msgpack: is_msgpack(headers.get(header::ACCEPT)),
            binary: BinaryOutputs::None,
        }
    }

    fn is_binary(&self, name: &str) -> bool {
        match &self.binary {
            BinaryOutputs::None => false,
            BinaryOutputs::All => true,
            BinaryOutputs::Named(names) => names.iter().any(|n| n == name),
        }
    }

    /// Encodes the answer: MessagePack, JSON, or a JSON header followed by
    /// the binary outputs in output order.
    pub(crate) fn encode(&self, response: &InferResponse) -> Response {
        let binary = !self.msgpack && response.outputs.iter().any(|o| self.is_binary(&o.name));
        let body = ResponseJson {
            model_name: &response.model_name,
            model_version: &response.model_version,
            id: response.id.as_deref(),
            outputs: response
                .outputs
                .iter()
                .map(|o| {
                    let as_binary = binary && self.is_binary(&o.name);
                    OutputJson {
                        name: &o.name,
                        datatype: o.datatype.as_str(),
                        shape: &o.shape,
                        parameters: as_binary
                            .then(|| serde_json::json!({ "binary_data_size": o.data.len() * 4 })),
                        data: (!as_binary).then_some(o.data.as_slice()),
                    }
                })
                .collect(),
        };
        if self.msgpack {
            return match rmp_serde::to_vec_named(&body) {
                Ok(bytes) => ([(header::CONTENT_TYPE, MSGPACK)], bytes).into_response(),
                Err(e) => {
                    ServeError::Internal(format!("cannot encode the response: {e}")).into_response()
                }
            };
        }
        let mut bytes = match serde_json::to_vec(&body) {
            Ok(bytes) => bytes,
            Err(e) => {
                return ServeError::Internal(format!("cannot encode the response: {e}"))
                    .into_response();
            }
        };
        if !binary {
            return ([(header::CONTENT_TYPE, "application/json")], bytes).into_response();
        }
        let header_len = bytes.len();
        for output in response.outputs.iter().filter(|o| self.is_binary(&o.name)) {
            bytes.reserve(output.data.len() * 4);
            for value in &output.data {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
        }
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static(INFERENCE_HEADER_CONTENT_LENGTH),
                    HeaderValue::from(header_len),
                ),
            ],
            bytes,
        )
            .into_response()
    }
}

/// Whether the body is in the raw single-input form
/// (`Inference-Header-Content-Length: 0`), which needs the model's
/// signature to decode.
pub(crate) fn is_raw(headers: &HeaderMap) -> bool {
    matches!(binary_header_length(headers), Ok(Some(0)))
}

/// The `Inference-Header-Content-Length` header: the length of the JSON
/// header before binary tensors (0: the raw form); `None` when absent.
fn binary_header_length(headers: &HeaderMap) -> Result<Option<usize>, ServeError> {
    headers
        .get(INFERENCE_HEADER_CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ServeError::Invalid(format!(
                        "Inference-Header-Content-Length must be a byte count, got {v:?}"
                    ))
                })
        })
        .transpose()
}

/// Decodes an inference body in whichever form its headers announce.
pub(crate) fn decode_request(
    headers: &HeaderMap,
    body: &[u8],
    version: Option<&ModelVersion>,
    answer: &mut Answer,
) -> Result<InferRequest, ServeError> {
    let header_len = binary_header_length(headers)?;
    let priority_header = headers
        .get(scheduling::PRIORITY_HEADER)
        .map(|h| {
            h.to_str()
                .map_err(|_| ServeError::Invalid("the x-priority header is not valid text".into()))
        })
        .transpose()?;
    match header_len {
        Some(0) => {
            answer.binary = BinaryOutputs::All;
            let version = version
                .ok_or_else(|| ServeError::Invalid("a raw binary request needs a model".into()))?;
            let mut request = raw_request(body, version)?;
            request.options = scheduling::resolve_options(None, None, None, priority_header)?;
            Ok(request)
        }
        Some(len) => {
            let Some((json, binary)) = body.split_at_checked(len) else {
                return Err(ServeError::Invalid(format!(
                    "Inference-Header-Content-Length is {len} but the body has only {} bytes",
                    body.len()
                )));
            };
            let request = read_json(json).map_err(|e| {
                ServeError::Invalid(format!("malformed inference request JSON header: {e}"))
            })?;
            answer.binary = binary_outputs(&request);
            request_from_wire(request, binary, priority_header)
        }
        None if is_msgpack(headers.get(header::CONTENT_TYPE)) => {
            let request: RequestJson = rmp_serde::from_slice(body).map_err(|e| {
                ServeError::Invalid(format!("malformed inference request MessagePack: {e}"))
            })?;
            answer.binary = binary_outputs(&request);
            request_from_wire(request, &[], priority_header)
        }
        None => {
            let request = read_json(body).map_err(malformed_json)?;
            answer.binary = binary_outputs(&request);
            request_from_wire(request, &[], priority_header)
        }
    }
}

/// Reads a JSON request: the flat `data` arrays with
/// [`json_numbers::split_request`], the rest with serde. When serde refuses
/// the rest, the whole body is read again by serde alone, so every error
/// (and its position) is the one serde gives.
fn read_json(body: &[u8]) -> Result<RequestJson, serde_json::Error> {
    if let Some(split) = json_numbers::split_request(body)
        && let Ok(mut request) = serde_json::from_slice::<RequestJson>(&split.rest)
    {
        for (input, values) in request.inputs.iter_mut().zip(split.data) {
            if let Some(values) = values {
                input.data = Some(FlatData(values));
            }
        }
        return Ok(request);
    }
    serde_json::from_slice(body)
}

/// A plain JSON body decoded by serde alone, without [`read_json`]'s fast
/// reader: the reference the fuzz target `infer_json` holds it to.
pub(crate) fn decode_json_with_serde_only(body: &[u8]) -> Result<InferRequest, ServeError> {
    let request: RequestJson = serde_json::from_slice(body).map_err(malformed_json)?;
    request_from_wire(request, &[], None)
}

fn malformed_json(error: serde_json::Error) -> ServeError {
    ServeError::Invalid(format!("malformed inference request JSON: {error}"))
}

/// Decodes an HTTP inference body (JSON, MessagePack or binary-tensor form,
/// not the raw form) exactly as the server does. Public for the decoding
/// benchmark only.
#[doc(hidden)]
pub fn decode_http_body(headers: &HeaderMap, body: &[u8]) -> Result<InferRequest, ServeError> {
    decode_request(headers, body, None, &mut Answer::default())
}

/// The raw single-input form (`Inference-Header-Content-Length: 0`): the
/// whole body is the model's only input, one row, all outputs binary.
fn raw_request(body: &[u8], version: &ModelVersion) -> Result<InferRequest, ServeError> {
    let [spec] = version.signature.inputs.as_slice() else {
        return Err(ServeError::Invalid(format!(
            "a raw binary request (Inference-Header-Content-Length: 0) needs a model with one input; '{}' has {}",
            version.name,
            version.signature.inputs.len()
        )));
    };
    let mut shape = vec![1i64];
    shape.extend(spec.dims.iter().map(|&d| d as i64));
    let datatype = spec.datatype.as_str().to_owned();
    let data = tensor_from_le_bytes(&spec.name, &datatype, body)?;
    Ok(InferRequest {
        id: None,
        inputs: vec![InputTensor {
            name: spec.name.clone(),
            datatype,
            shape,
            data,
        }],
        outputs: None,
        options: Default::default(),
        parameters: Default::default(),
    })
}

fn flag(parameters: Option<&serde_json::Map<String, serde_json::Value>>, key: &str) -> bool {
    parameters
        .and_then(|p| p.get(key))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// Outputs to send binary: all with the request-wide `binary_data_output`,
/// or those requested with `"binary_data": true`.
fn binary_outputs(request: &RequestJson) -> BinaryOutputs {
    let named: Vec<String> = request
        .outputs
        .iter()
        .flatten()
        .filter(|o| flag(o.parameters.as_ref(), "binary_data"))
        .map(|o| o.name.clone())
        .collect();
    if flag(request.parameters.as_ref(), "binary_data_output") {
        BinaryOutputs::All
    } else if named.is_empty() {
        BinaryOutputs::None
    } else {
        BinaryOutputs::Named(named)
    }
}

/// An input's `binary_data_size` parameter, if it has one.
pub(crate) fn binary_data_size(
    parameters: Option<&serde_json::Map<String, serde_json::Value>>,
    name: &str,
) -> Result<Option<usize>, ServeError> {
    let Some(value) = parameters.and_then(|p| p.get("binary_data_size")) else {
        return Ok(None);
    };
    value
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| {
            ServeError::Invalid(format!(
                "input '{name}' has binary_data_size {value}; it must be a byte count"
            ))
        })
}

/// Decodes little-endian row-major tensor bytes. Only FP32 is decoded:
/// another datatype yields no values, and validation against the model's
/// signature then refuses it with the datatype the model takes.
pub(crate) fn tensor_from_le_bytes(
    name: &str,
    datatype: &str,
    bytes: &[u8],
) -> Result<Vec<f32>, ServeError> {
    if datatype != "FP32" {
        return Ok(Vec::new());
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(ServeError::Invalid(format!(
            "input '{name}' has {} bytes of FP32 data, not a multiple of 4",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

// === JSON wire format ===

/// The request body's structure, shared by the JSON, MessagePack and
/// binary-tensor forms (the latter's JSON header omits `data` of inputs
/// that carry `binary_data_size`).
#[derive(Debug, Deserialize)]
pub(crate) struct RequestJson {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    pub(crate) inputs: Vec<InputJson>,
    #[serde(default)]
    pub(crate) outputs: Option<Vec<RequestedOutputJson>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputJson {
    pub(crate) name: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) datatype: String,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub(crate) data: Option<FlatData>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequestedOutputJson {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Converts the decoded body into the protocol-neutral request. `binary`
/// holds the raw tensors that follow a binary-tensor request's JSON header,
/// consumed in input order by inputs with `binary_data_size`;
/// `priority_header` is the `x-priority` header.
pub(crate) fn request_from_wire(
    request: RequestJson,
    binary: &[u8],
    priority_header: Option<&str>,
) -> Result<InferRequest, ServeError> {
    let parameter = |name: &str| {
        request
            .parameters
            .as_ref()
            .and_then(|p| p.get(name))
            .map(Param::from_json)
    };
    let options = scheduling::resolve_options(
        parameter(scheduling::PRIORITY_PARAMETER),
        parameter(scheduling::REQUEST_TYPE_PARAMETER),
        parameter(scheduling::TIMEOUT_PARAMETER),
        priority_header,
    )?;
    let mut rest = binary;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for i in request.inputs {
        let data = match (binary_data_size(i.parameters.as_ref(), &i.name)?, i.data) {
            (Some(size), _) => {
                let Some((bytes, tail)) = rest.split_at_checked(size) else {
                    return Err(ServeError::Invalid(format!(
                        "input '{}' has binary_data_size {size} but only {} bytes of binary data remain",
                        i.name,
                        rest.len()
                    )));
                };
                rest = tail;
                tensor_from_le_bytes(&i.name, &i.datatype, bytes)?
            }
            (None, Some(data)) => data.0,
            (None, None) => {
                return Err(ServeError::Invalid(format!(
                    "input '{}' has neither data nor binary_data_size",
                    i.name
                )));
            }
        };
        inputs.push(InputTensor {
            name: i.name,
            datatype: i.datatype,
            shape: i.shape,
            data,
        });
    }
    if !rest.is_empty() {
        return Err(ServeError::Invalid(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            rest.len()
        )));
    }
    Ok(InferRequest {
        options,
        id: request.id,
        inputs,
        outputs: request
            .outputs
            .map(|outputs| outputs.into_iter().map(|o| o.name).collect()),
        parameters: request.parameters.unwrap_or_default(),
    })
}

#[derive(Serialize)]
pub(crate) struct ResponseJson<'a> {
    pub(crate) model_name: &'a str,
    pub(crate) model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<&'a str>,
    pub(crate) outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
pub(crate) struct OutputJson<'a> {
    pub(crate) name: &'a str,
    pub(crate) datatype: &'static str,
    pub(crate) shape: &'a [usize],
    /// `{"binary_data_size": N}` when the data follows the JSON header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<&'a [f32]>,
}

/// Tensor `data`, flat or nested to any depth, flattened in row-major
/// order while parsing (no intermediate `serde_json::Value` tree).
#[derive(Debug, Default)]
pub(crate) struct FlatData(pub(crate) Vec<f32>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut values = Vec::new();
        deserializer.deserialize_any(Flatten(&mut values))?;
        Ok(FlatData(values))
    }
}

struct Flatten<'a>(&'a mut Vec<f32>);

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers, flat or nested")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(hint) = seq.size_hint() {
            self.0.reserve(hint);
        }
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_decode_to_the_same_bits() {
        let values = [0.1f32, -2.5, f32::MIN_POSITIVE, 1e30];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(tensor_from_le_bytes("x", "FP32", &bytes).unwrap(), values);
        let err = tensor_from_le_bytes("x", "FP32", &bytes[..5]).unwrap_err();
        assert!(err.to_string().contains("multiple of 4"), "{err}");
    }

    #[test]
    fn the_raw_form_is_recognised_as_decode_request_reads_the_header() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, value.parse().unwrap());
            headers
        };
        for raw in ["0", " 0 ", "00"] {
            assert!(is_raw(&with(raw)), "{raw:?}");
        }
        for not_raw in ["12", "x"] {
            assert!(!is_raw(&with(not_raw)), "{not_raw:?}");
        }
        assert!(!is_raw(&HeaderMap::new()));
    }

    #[test]
    fn binary_outputs_follow_request_and_output_parameters() {
        let parse = |text: &str| binary_outputs(&serde_json::from_str(text).unwrap());
        assert_eq!(parse(r#"{"inputs":[]}"#), BinaryOutputs::None);
        assert_eq!(
            parse(r#"{"inputs":[],"parameters":{"binary_data_output":true}}"#),
            BinaryOutputs::All
        );
        assert_eq!(
            parse(
                r#"{"inputs":[],"outputs":[{"name":"a","parameters":{"binary_data":true}},{"name":"b"}]}"#
            ),
            BinaryOutputs::Named(vec!["a".into()])
        );
    }

    #[test]
    fn binary_inputs_take_their_bytes_in_order() {
        let header = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},{"name":"b","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let request: RequestJson = serde_json::from_slice(header).unwrap();
        let tail: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let decoded = request_from_wire(request, &tail, None).unwrap();
        assert_eq!(decoded.inputs[0].data, vec![1.0]);
        assert_eq!(decoded.inputs[1].data, vec![2.0, 3.0]);
        let request: RequestJson = serde_json::from_slice(header).unwrap();
        let err = request_from_wire(request, &tail[..8], None).unwrap_err();
        assert!(err.to_string().contains("remain"), "{err}");
    }

    #[test]
    fn msgpack_accept_is_recognised() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!Answer::from_accept(&headers).msgpack);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/plain, application/msgpack;q=0.9"),
        );
        assert!(Answer::from_accept(&headers).msgpack);
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;
    use axum::http::StatusCode;

    fn decode_json(body: &[u8], priority_header: Option<&str>) -> Result<InferRequest, ServeError> {
        let request = read_json(body).map_err(malformed_json)?;
        request_from_wire(request, &[], priority_header)
    }

    #[test]
    fn the_fast_json_reader_gives_what_serde_alone_gives() {
        let input =
            |data: &str| format!(r#"{{"name":"x","shape":[2],"datatype":"FP32","data":{data}}}"#);
        let bodies = [
            format!(r#"{{"inputs":[{}]}}"#, input("[1.5,-0.0]")),
            format!(
                r#"{{"id":"\"data\":[1]","inputs":[{},{}]}}"#,
                input("[[1],[2]]"),
                input("[3e-1, 4]")
            ),
            format!(
                r#"{{"inputs":[{}],"parameters":{{"priority":1}}}}"#,
                input(" [ 0.1 , 0.2 ] ")
            ),
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","d\u0061ta":[1,2]}]}"#.into(),
            // Errors after, inside and around a flat array keep serde's
            // message and position.
            r#"{"inputs":[{"name":"x","data":[1,2],"shape":"two","datatype":"FP32"}]}"#.into(),
            r#"{"inputs":[{"name":"x","data":[1,2],"data":[3,4],"shape":[2],"datatype":"FP32"}]}"#
                .into(),
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,02]}]}"#.into(),
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]} x"#.into(),
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}],"inputs":[]}"#
                .into(),
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e400]}]}"#.into(),
        ];
        for body in &bodies {
            let text = |r: Result<InferRequest, ServeError>| match r {
                Ok(request) => format!("{request:?}"),
                Err(e) => e.to_string(),
            };
            assert_eq!(
                text(decode_json(body.as_bytes(), None)),
                text(decode_json_with_serde_only(body.as_bytes())),
                "{body}"
            );
        }
    }

    #[test]
    fn nested_and_flat_data_decode_to_the_same_values() {
        let flat = decode_json(
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,-3,4e0]}]}"#,
            None,
        )
        .unwrap();
        let nested = decode_json(br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4e0]]}]}"#, None).unwrap();
        assert_eq!(flat.inputs[0].data, vec![1.0, 2.5, -3.0, 4.0]);
        assert_eq!(flat, nested);
        assert_eq!(flat.id, None);
        assert_eq!(flat.outputs, None);
    }

    #[test]
    fn strings_in_data_are_refused_with_a_reason() {
        let err = decode_json(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("array of numbers"), "{err}");
    }

    #[test]
    fn json_floats_round_trip_to_the_same_f32_bits() {
        let value = 0.1f32;
        let text = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":[{}]}}]}}"#,
            value as f64
        );
        let decoded = decode_json(text.as_bytes(), None).unwrap();
        assert_eq!(decoded.inputs[0].data[0].to_bits(), value.to_bits());
    }

    #[test]
    fn scheduling_parameters_and_the_header_become_options() {
        let body = br#"{"parameters":{"request_type":"real_time_trading","timeout":2500},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let decoded = decode_json(body, Some("5")).unwrap();
        assert_eq!(
            decoded.options.priority,
            tickserve_scheduler::Priority::new(1)
        );
        assert_eq!(
            decoded.options.timeout,
            Some(std::time::Duration::from_micros(2500))
        );
        let plain = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let decoded = decode_json(plain, Some("background")).unwrap();
        assert_eq!(
            decoded.options.priority,
            tickserve_scheduler::Priority::new(5)
        );
        let bad = br#"{"parameters":{"priority":7},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let err = decode_json(bad, None).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(
            err.to_string().contains("invalid priority parameter 7"),
            "{err}"
        );
    }
}
