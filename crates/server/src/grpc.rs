//! The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`
//! from proto/grpc_service.proto (KServe's field numbers, plus Triton's
//! ModelStreamInfer, ModelConfig, ModelStatistics and RepositoryIndex), so
//! tritonclient and perf_analyzer work unchanged.
//!
//! Each RPC translates its message into the protocol-neutral
//! [`InferRequest`], calls the same inference path as HTTP (crate::infer:
//! same scheduler, validation, limits, metrics and SLA sample) and
//! translates the answer back;
//! failures become a `tonic::Status` through the one mapping in
//! [`crate::error`]. Tensors arrive either as typed `contents` or as
//! little-endian `raw_input_contents`; the answer uses the same form the
//! request used. The stream RPC runs a bounded number of requests of one
//! stream at once and answers each as it completes (clients match answers
//! by `id`, as with Triton). ModelInfer reads the caller's trace context
//! from the `traceparent` metadata and answers with `traceparent` and
//! `x-request-id` metadata ([`crate::trace`]).

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::AppState;
use crate::codec;
use crate::error::ServeError;
use crate::models::{InferRequest, InferResponse, InputTensor, ModelVersion};
use crate::scheduling::{self, Param};
use crate::trace::{Incoming, Protocol, RequestTrace};
use crate::triton;
use tickserve_scheduler::stats::Timing;

/// Code generated from proto/grpc_service.proto.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::GrpcInferenceService;
pub use pb::grpc_inference_service_server::GrpcInferenceServiceServer;

/// Requests of one stream in flight at once; the next waits for a slot.
const STREAM_IN_FLIGHT: usize = 256;
/// Answers of one stream buffered for a slow reader.
const STREAM_BUFFER: usize = 256;

/// The gRPC service; cheap to clone (shares the HTTP [`AppState`]).
#[derive(Debug, Clone)]
pub(crate) struct InferenceService {
    state: AppState,
}

impl InferenceService {
    pub(crate) fn new(state: AppState) -> Self {
        InferenceService { state }
    }
}

fn version_arg(version: &str) -> Option<&str> {
    (!version.is_empty()).then_some(version)
}

fn lookup(state: &AppState, name: &str, version: &str) -> Result<Arc<ModelVersion>, ServeError> {
    state.registry()?.get(name)?.version(version_arg(version))
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        lookup(&self.state, &request.name, &request.version)?;
        Ok(Response::new(pb::ModelReadyResponse {
            ready: !self.state.is_draining(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "tickserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: codec::EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let registry = self.state.registry()?;
        let model = registry.get(&request.name)?;
        let version = model.version(version_arg(&request.version))?;
        let tensor = |spec: &tickserve_engine::TensorSpec| {
            let mut shape = vec![-1i64];
            shape.extend(spec.dims.iter().map(|&d| d as i64));
            pb::model_metadata_response::TensorMetadata {
                name: spec.name.clone(),
                datatype: spec.datatype.as_str().to_owned(),
                shape,
            }
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions: model.version_names(),
            platform: "onnx".into(),
            inputs: version.signature.inputs.iter().map(tensor).collect(),
            outputs: version.signature.outputs.iter().map(tensor).collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let trace = RequestTrace::start(Protocol::Grpc, &Incoming::from_grpc(request.metadata()));
        let answer = infer(&self.state, request.into_inner(), &trace)
            .instrument(trace.span().clone())
            .await;
        match answer {
            Ok(answer) => {
                let mut response = Response::new(answer);
                trace.tag_grpc(response.metadata_mut());
                Ok(response)
            }
            Err(error) => {
                let mut status = Status::from(error);
                trace.tag_grpc(status.metadata_mut());
                Err(status)
            }
        }
    }

    type ModelStreamInferStream = ReceiverStream<Result<pb::ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        // Every request of the stream joins the caller's trace, if any,
        // with an `infer` span of its own; a stream's answers carry no
        // metadata of their own, so each names its ids in its parameters.
        let incoming = Incoming::from_grpc(request.metadata());
        let parent = (
            incoming.traceparent.map(str::to_owned),
            incoming.tracestate.map(str::to_owned),
        );
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        let slots = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(request)) => {
                        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                            break;
                        };
                        let (tx, state) = (tx.clone(), state.clone());
                        let trace = RequestTrace::start(
                            Protocol::Grpc,
                            &Incoming {
                                traceparent: parent.0.as_deref(),
                                tracestate: parent.1.as_deref(),
                                request_id: None,
                            },
                        );
                        tokio::spawn(async move {
                            let (id, model_name, model_version) = (
                                request.id.clone(),
                                request.model_name.clone(),
                                request.model_version.clone(),
                            );
                            let answered = infer(&state, request, &trace)
                                .instrument(trace.span().clone())
                                .await;
                            let mut answer = match answered {
                                Ok(response) => pb::ModelStreamInferResponse {
                                    error_message: String::new(),
                                    infer_response: Some(response),
                                },
                                Err(error) => pb::ModelStreamInferResponse {
                                    error_message: error.to_string(),
                                    infer_response: Some(pb::ModelInferResponse {
                                        model_name,
                                        model_version,
                                        id,
                                        ..Default::default()
                                    }),
                                },
                            };
                            if let Some(response) = answer.infer_response.as_mut() {
                                tag_parameters(&trace, &mut response.parameters);
                            }
                            let _ = tx.send(Ok(answer)).await;
                            drop(slot);
                        });
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let version = lookup(&self.state, &request.name, &request.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model_config(&triton::ModelConfigJson::of(&version))),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let registry = self.state.registry()?;
        let model = (!request.name.is_empty()).then_some(request.name.as_str());
        let versions = triton::versions(registry, model, version_arg(&request.version))?;
        let duration = |t: Timing| {
            Some(pb::StatisticDuration {
                count: t.count,
                ns: t.ns,
            })
        };
        Ok(Response::new(pb::ModelStatisticsResponse {
            model_stats: versions
                .into_iter()
                .map(|v| {
                    let triton = v.stats();
                    let totals = triton::TritonTotals::of(&triton);
                    let stats = triton.scheduler;
                    pb::ModelStatistics {
                        name: v.name.clone(),
                        version: v.version.to_string(),
                        last_inference: stats.last_inference_ms,
                        inference_count: stats.inference_count,
                        execution_count: stats.execution_count,
                        inference_stats: Some(pb::InferStatistics {
                            success: duration(totals.success),
                            fail: duration(totals.fail),
                            queue: duration(totals.queue),
                            compute_input: duration(totals.compute_input),
                            compute_infer: duration(totals.compute_infer),
                            compute_output: duration(totals.compute_output),
                            cache_hit: duration(totals.cache_hit),
                            cache_miss: duration(totals.cache_miss),
                        }),
                        batch_stats: stats
                            .batches
                            .iter()
                            .map(|b| pb::InferBatchStatistics {
                                batch_size: b.batch_size as u64,
                                compute_input: duration(b.compute_input),
                                compute_infer: duration(b.compute_infer),
                                compute_output: duration(b.compute_output),
                            })
                            .collect(),
                    }
                })
                .collect(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        let registry = self.state.registry()?;
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: registry
                .index()
                .into_iter()
                .filter(|row| !ready_only || row.state == "READY")
                .map(|row| pb::repository_index_response::ModelIndex {
                    name: row.name,
                    version: row.version,
                    state: row.state.into(),
                    reason: row.reason,
                })
                .collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .parameters
            .get("config")
            .and_then(|p| match &p.parameter_choice {
                Some(pb::model_repository_parameter::ParameterChoice::StringParam(s)) => {
                    Some(s.clone())
                }
                Some(pb::model_repository_parameter::ParameterChoice::BytesParam(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                _ => None,
            });
        crate::repository_api::load(&self.state, request.model_name, config).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        crate::repository_api::unload(&self.state, request.into_inner().model_name).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

fn data_type(name: &str) -> i32 {
    pb::DataType::from_str_name(name).map_or(pb::DataType::TypeInvalid as i32, |t| t as i32)
}

fn model_config(config: &triton::ModelConfigJson) -> pb::ModelConfig {
    pb::ModelConfig {
        name: config.name.clone(),
        platform: config.platform.into(),
        backend: config.backend.into(),
        max_batch_size: i32::try_from(config.max_batch_size).unwrap_or(i32::MAX),
        input: config
            .input
            .iter()
            .map(|i| pb::ModelInput {
                name: i.name.clone(),
                data_type: data_type(i.data_type),
                dims: i.dims.clone(),
            })
            .collect(),
        output: config
            .output
            .iter()
            .map(|o| pb::ModelOutput {
                name: o.name.clone(),
                data_type: data_type(o.data_type),
                dims: o.dims.clone(),
            })
            .collect(),
        instance_group: config
            .instance_group
            .iter()
            .map(|g| pb::ModelInstanceGroup {
                name: g.name.clone(),
                count: i32::try_from(g.count).unwrap_or(i32::MAX),
                kind: pb::model_instance_group::Kind::Cpu as i32,
            })
            .collect(),
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching {
                preferred_batch_size: Vec::new(),
                max_queue_delay_microseconds: config.dynamic_batching.max_queue_delay_microseconds,
            },
        )),
    }
}

/// One unary inference through the same path as HTTP.
async fn infer(
    state: &AppState,
    mut request: pb::ModelInferRequest,
    trace: &RequestTrace,
) -> Result<pb::ModelInferResponse, ServeError> {
    let model = std::mem::take(&mut request.model_name);
    let version = std::mem::take(&mut request.model_version);
    let raw = !request.raw_input_contents.is_empty();
    crate::infer::infer(state, Protocol::Grpc, &model, version_arg(&version), |_| {
        request_from_proto(request).0
    })
    .await
    .map(|response| trace.encode(|| response_to_proto(response, raw)))
}

/// Decodes a serialized `ModelInferRequest` exactly as the service does.
/// Public for the decoding benchmark only.
#[doc(hidden)]
pub fn decode_infer_message(bytes: &[u8]) -> Result<InferRequest, ServeError> {
    let message = <pb::ModelInferRequest as prost::Message>::decode(bytes)
        .map_err(|e| ServeError::Invalid(format!("malformed ModelInferRequest: {e}")))?;
    request_from_proto(message).0
}

/// The protocol-neutral request, and whether tensors came as raw bytes.
fn request_from_proto(request: pb::ModelInferRequest) -> (Result<InferRequest, ServeError>, bool) {
    let raw = !request.raw_input_contents.is_empty();
    let decode = || {
        if raw && request.raw_input_contents.len() != request.inputs.len() {
            return Err(ServeError::Invalid(format!(
                "the request has {} inputs but {} raw_input_contents",
                request.inputs.len(),
                request.raw_input_contents.len()
            )));
        }
        let mut inputs = Vec::with_capacity(request.inputs.len());
        for (index, tensor) in request.inputs.into_iter().enumerate() {
            let data = if raw {
                if tensor.contents.is_some_and(|c| !c.fp32_contents.is_empty()) {
                    return Err(ServeError::Invalid(format!(
                        "input '{}' has contents although the request uses raw_input_contents",
                        tensor.name
                    )));
                }
                codec::tensor_from_le_bytes(
                    &tensor.name,
                    &tensor.datatype,
                    &request.raw_input_contents[index],
                )?
            } else if tensor.datatype == "FP32" {
                tensor.contents.map(|c| c.fp32_contents).unwrap_or_default()
            } else {
                // Validation refuses the datatype with the one the model takes.
                Vec::new()
            };
            inputs.push(InputTensor {
                name: tensor.name,
                datatype: tensor.datatype,
                shape: tensor.shape,
                data,
            });
        }
        let param = |name: &str| request.parameters.get(name).map(parameter);
        // Priority, request type and timeout mean what they mean over HTTP.
        let options = scheduling::resolve_options(
            param(scheduling::PRIORITY_PARAMETER),
            param(scheduling::REQUEST_TYPE_PARAMETER),
            param(scheduling::TIMEOUT_PARAMETER),
            None,
        )?;
        Ok(InferRequest {
            id: (!request.id.is_empty()).then_some(request.id),
            inputs,
            outputs: (!request.outputs.is_empty())
                .then(|| request.outputs.into_iter().map(|o| o.name).collect()),
            options,
            parameters: request
                .parameters
                .iter()
                .map(|(name, value)| (name.clone(), json_parameter(value)))
                .collect(),
        })
    };
    (decode(), raw)
}

/// A gRPC request parameter as the JSON value the HTTP form would carry
/// (the result cache reads `cache` and keys on the others).
fn json_parameter(value: &pb::InferParameter) -> serde_json::Value {
    use pb::infer_parameter::ParameterChoice;
    match &value.parameter_choice {
        Some(ParameterChoice::BoolParam(v)) => serde_json::Value::Bool(*v),
        Some(ParameterChoice::Int64Param(v)) => serde_json::Value::from(*v),
        Some(ParameterChoice::Uint64Param(v)) => serde_json::Value::from(*v),
        Some(ParameterChoice::StringParam(v)) => serde_json::Value::String(v.clone()),
        Some(ParameterChoice::DoubleParam(v)) => serde_json::Value::from(*v),
        None => serde_json::Value::Null,
    }
}

/// A gRPC request parameter in the form the scheduling options take.
fn parameter(value: &pb::InferParameter) -> Param<'_> {
    use pb::infer_parameter::ParameterChoice;
    match &value.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => Param::Int(*v),
        Some(ParameterChoice::Uint64Param(v)) => {
            i64::try_from(*v).map_or(Param::Other("uint64"), Param::Int)
        }
        Some(ParameterChoice::StringParam(v)) => Param::Str(v),
        Some(ParameterChoice::BoolParam(_)) => Param::Other("bool"),
        Some(ParameterChoice::DoubleParam(_)) => Param::Other("double"),
        None => Param::Other("empty"),
    }
}

fn response_to_proto(response: InferResponse, raw: bool) -> pb::ModelInferResponse {
    let mut raw_output_contents = Vec::new();
    let outputs = response
        .outputs
        .into_iter()
        .map(|o| {
            let contents = if raw {
                let mut bytes = Vec::with_capacity(o.data.len() * 4);
                for value in &o.data {
                    bytes.extend_from_slice(&value.to_le_bytes());
                }
                raw_output_contents.push(bytes);
                None
            } else {
                Some(pb::InferTensorContents {
                    fp32_contents: o.data,
                    ..Default::default()
                })
            };
            pb::model_infer_response::InferOutputTensor {
                name: o.name,
                datatype: o.datatype.as_str().to_owned(),
                shape: o.shape.iter().map(|&d| d as i64).collect(),
                parameters: Default::default(),
                contents,
            }
        })
        .collect();
    pb::ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id.unwrap_or_default(),
        parameters: Default::default(),
        outputs,
        raw_output_contents,
    }
}

/// Adds `traceparent` and `x-request-id` to the parameters of one
/// `ModelStreamInfer` answer: a stream has one set of metadata for all its
/// answers, so each answer names its own request's ids.
fn tag_parameters(
    trace: &RequestTrace,
    parameters: &mut std::collections::HashMap<String, pb::InferParameter>,
) {
    use pb::infer_parameter::ParameterChoice;
    for (name, value) in trace.ids() {
        parameters.insert(
            name.to_owned(),
            pb::InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
            },
        );
    }
}
