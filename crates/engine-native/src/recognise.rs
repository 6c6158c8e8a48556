//! Reads an ONNX graph and recognises the CNN+LSTM family in it.
//!
//! The recogniser walks the nodes in their (topological) file order and
//! keeps an abstract value for every tensor name:
//!
//! * `Const`: initializers and `Constant` nodes (weights, indices, axes);
//! * `Shape`: 1-D int64 tensors computed from shapes, with the batch size
//!   left symbolic (exporters build initial LSTM states this way);
//! * `Zeros`: all-zero float tensors of a symbolic shape (those states);
//! * `Act`: the activation flowing from the model input to its output,
//!   with the logical order of its axes.
//!
//! Shape arithmetic is evaluated away, transposes only permute the logical
//! axes (the engine keeps one physical layout, see [`crate::model`]), and
//! every node that does real work becomes a layer of the [`Plan`]. Any node
//! or attribute outside the family stops loading with an error that names
//! the node.
//!
//! QDQ models (quantisation-aware training exports, or ONNX Runtime's
//! `quantize_static` in QDQ format) wrap the same ops in
//! QuantizeLinear/DequantizeLinear pairs, and are run with the model's own
//! scales:
//!
//! * a DequantizeLinear of a constant evaluates at load to the float
//!   weights (so any op can use them), and an int8 one with zero points 0
//!   is also kept as it is: symmetric int8 weights with a scale per output
//!   channel (or one per tensor);
//! * a QuantizeLinear on the activation gives a `QAct` that only a
//!   DequantizeLinear with the same scale may read; the pair's result is
//!   the activation again, with the rounding it went through remembered
//!   (`rounding`, carried through transposes and squeezes);
//! * a Conv or Gemm whose weights are such int8 constants and whose input
//!   went through a pair becomes an int8 layer: the pair's scale and zero
//!   point quantise its input (uint8; int8 activations are shifted by 128,
//!   the same values), the weights are the model's bytes;
//! * any other reader of a rounded activation (an LSTM, an fp32 layer, the
//!   graph output) gets the rounding applied to the previous layer's
//!   output ([`Plan::output_quant`]), exactly what the pair computes.
//!
//! This file holds the abstract values, the walk and the per-node
//! dispatch; the shape and indexing nodes are evaluated in `shapes`, the
//! layers (with their weights) are built in `layers`, and the
//! QuantizeLinear/DequantizeLinear handling is in `qdq`.

use std::collections::HashMap;

use crate::kernels::{PackedMatrix, PackedRecurrent, detect_simd};
use crate::model::{Conv1d, Linear, Lstm, Plan, SeqLayer};
use crate::onnx::{ConstData, GraphProto, NodeProto, TensorProto, elem_type};
use crate::quant::{ActQuant, LowMat, Precision, QWeights};

mod layers;
mod qdq;
mod shapes;

/// A dimension whose size is known at load time, or the batch axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Batch,
    Known(i64),
}

/// The meaning of one axis of the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Batch,
    Time,
    Channel,
    /// The size-1 direction axis of an LSTM output.
    Direction,
}

#[derive(Debug, Clone)]
struct Const {
    dims: Vec<usize>,
    data: ConstData,
    /// The ONNX element type (int8 and uint8 zero points differ).
    elem: i32,
}

#[derive(Debug, Clone)]
enum Value {
    Const(Const),
    Shape(Vec<Dim>),
    Zeros(Vec<Dim>),
    Act(Vec<Axis>),
    /// The activation as integers (a QuantizeLinear's output), with the
    /// quantisation as uint8.
    QAct(Vec<Axis>, ActQuant),
}

/// Int8 weights a DequantizeLinear reads: `q` in the constant's layout,
/// one scale per index of `axis` (or one for the tensor), zero points 0.
#[derive(Debug, Clone)]
struct QuantizedConst {
    q: Vec<i8>,
    scales: Vec<f32>,
    axis: usize,
}

impl QuantizedConst {
    /// The scale of each of the `n` slices along `axis`.
    fn scales_along(&self, axis: usize, n: usize) -> Option<Vec<f32>> {
        match self.scales.as_slice() {
            [one] => Some(vec![*one; n]),
            all if self.axis == axis && all.len() == n => Some(all.to_vec()),
            _ => None,
        }
    }
}

/// Where the activation is in the family's fixed order of stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Conv,
    Lstm,
    Head,
}

struct Recogniser {
    values: HashMap<String, Value>,
    time: usize,
    channels: usize,
    stage: Stage,
    seq: Vec<SeqLayer>,
    head: Vec<Linear>,
    /// The value name of the activation produced by the last layer, so a
    /// following `Relu` can be fused into it.
    last_layer_output: Option<String>,
    /// QDQ: the roundings (QuantizeLinear→DequantizeLinear pairs) an
    /// activation went through since the last layer's output, in order.
    rounding: HashMap<String, Vec<ActQuant>>,
    /// QDQ: DequantizeLinear outputs that are int8 weights.
    quantized: HashMap<String, QuantizedConst>,
    /// QDQ: roundings applied to layer outputs (see [`Plan::output_quant`]).
    output_quant: Vec<(usize, ActQuant)>,
    /// QDQ: layers that run in int8.
    int8_layers: usize,
}

fn unsupported(node: &NodeProto, why: impl std::fmt::Display) -> String {
    format!("{}: {why}", node.describe())
}

/// Recognises the model in `graph`. `input` and `output` name the graph's
/// single data input and output.
pub(crate) fn recognise(graph: &GraphProto) -> Result<Plan, String> {
    let initializer_names: Vec<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let data_inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializer_names.contains(&i.name.as_deref().unwrap_or("")))
        .collect();
    let [input] = data_inputs.as_slice() else {
        return Err(format!(
            "the native engine runs models with exactly one input; this graph has {}",
            data_inputs.len()
        ));
    };
    let [output] = graph.output.as_slice() else {
        return Err(format!(
            "the native engine runs models with exactly one output; this graph has {}",
            graph.output.len()
        ));
    };
    let input_name = input.name.clone().unwrap_or_default();
    let tensor_type = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| format!("input '{input_name}' is not a tensor"))?;
    if tensor_type.elem_type != Some(elem_type::FLOAT) {
        return Err(format!("input '{input_name}' is not float32"));
    }
    let dims: Vec<Option<i64>> = tensor_type
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| d.dim_value.filter(|&v| v > 0))
                .collect()
        })
        .unwrap_or_default();
    let (time, features) = match dims.as_slice() {
        [_, Some(t), Some(f)] => (*t as usize, *f as usize),
        _ => {
            return Err(format!(
                "input '{input_name}' must have shape [batch, time, features] with fixed time and features, found {dims:?}"
            ));
        }
    };

    let mut rec = Recogniser {
        values: HashMap::new(),
        time,
        channels: features,
        stage: Stage::Conv,
        seq: Vec::new(),
        head: Vec::new(),
        last_layer_output: None,
        rounding: HashMap::new(),
        quantized: HashMap::new(),
        output_quant: Vec::new(),
        int8_layers: 0,
    };
    for tensor in &graph.initializer {
        let name = tensor.name.clone().unwrap_or_default();
        let value = decode_const(tensor).map_err(|e| format!("initializer '{name}': {e}"))?;
        rec.values.insert(name, Value::Const(value));
    }
    rec.values.insert(
        input_name,
        Value::Act(vec![Axis::Batch, Axis::Time, Axis::Channel]),
    );
    for node in &graph.node {
        rec.node(node)?;
    }

    let output_name = output.name.clone().unwrap_or_default();
    if let Some(chain) = rec.rounding.get(&output_name).cloned()
        && let Some(last) = graph.node.last()
    {
        rec.round_last_output(last, &chain)?;
    }
    match rec.values.get(&output_name) {
        Some(Value::Act(axes)) if axes == &[Axis::Batch, Axis::Channel] => {}
        _ => {
            return Err(format!(
                "output '{output_name}' is not the [batch, width] result of the model's head"
            ));
        }
    }
    if rec.stage != Stage::Head {
        return Err("the graph never takes the last time step of an LSTM".into());
    }
    Ok(Plan {
        time_steps: time,
        features,
        seq: rec.seq,
        head: rec.head,
        output_width: rec.channels,
        // Only a QDQ model's own int8 layers make the plan int8 here.
        precision: if rec.int8_layers > 0 {
            Precision::Int8
        } else {
            Precision::Fp32
        },
        output_quant: rec.output_quant,
    })
}

fn decode_const(tensor: &TensorProto) -> Result<Const, String> {
    let dims = tensor
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = tensor.decode()?;
    let len = match &data {
        ConstData::Float(v) => v.len(),
        ConstData::Int(v) => v.len(),
    };
    if len != dims.iter().product::<usize>() {
        return Err(format!("{len} values for dims {dims:?}"));
    }
    Ok(Const {
        dims,
        data,
        elem: tensor.data_type.unwrap_or(0),
    })
}

impl Recogniser {
    fn get(&self, node: &NodeProto, index: usize) -> Result<&Value, String> {
        let name = node
            .input_name(index)
            .ok_or_else(|| unsupported(node, format!("input {index} is missing")))?;
        self.values.get(name).ok_or_else(|| {
            unsupported(
                node,
                format!("input '{name}' is not produced earlier in the graph"),
            )
        })
    }

    fn act(&self, node: &NodeProto, index: usize) -> Result<Vec<Axis>, String> {
        match self.get(node, index)? {
            Value::Act(axes) => Ok(axes.clone()),
            _ => Err(unsupported(
                node,
                format!("input {index} is expected to be the model's activation"),
            )),
        }
    }

    fn float_const(
        &self,
        node: &NodeProto,
        index: usize,
    ) -> Result<(Vec<usize>, Vec<f32>), String> {
        match self.get(node, index)? {
            Value::Const(Const {
                dims,
                data: ConstData::Float(v),
                ..
            }) => Ok((dims.clone(), v.clone())),
            _ => Err(unsupported(
                node,
                format!("input {index} must be a float constant (weights)"),
            )),
        }
    }

    fn int_list(&self, node: &NodeProto, index: usize) -> Result<Vec<i64>, String> {
        match self.get(node, index)? {
            Value::Const(Const {
                data: ConstData::Int(v),
                ..
            }) => Ok(v.clone()),
            Value::Shape(dims) => dims
                .iter()
                .map(|d| match d {
                    Dim::Known(v) => Ok(*v),
                    Dim::Batch => Err(unsupported(
                        node,
                        "needs a constant that depends on the batch size",
                    )),
                })
                .collect(),
            _ => Err(unsupported(
                node,
                format!("input {index} must be an integer constant"),
            )),
        }
    }

    /// A 1-D symbolic int tensor (a constant or a computed shape).
    fn shape_list(&self, node: &NodeProto, index: usize) -> Result<Vec<Dim>, String> {
        match self.get(node, index)? {
            Value::Const(Const {
                data: ConstData::Int(v),
                ..
            }) => Ok(v.iter().map(|&x| Dim::Known(x)).collect()),
            Value::Shape(dims) => Ok(dims.clone()),
            _ => Err(unsupported(node, format!("input {index} must be a shape"))),
        }
    }

    fn set(&mut self, node: &NodeProto, index: usize, value: Value) {
        if let Some(name) = node.output.get(index).filter(|n| !n.is_empty()) {
            self.values.insert(name.clone(), value);
        }
    }

    fn axis_size(&self, axis: Axis) -> Dim {
        match axis {
            Axis::Batch => Dim::Batch,
            Axis::Time => Dim::Known(self.time as i64),
            Axis::Channel => Dim::Known(self.channels as i64),
            Axis::Direction => Dim::Known(1),
        }
    }

    fn node(&mut self, node: &NodeProto) -> Result<(), String> {
        if node
            .domain
            .as_deref()
            .is_some_and(|d| !d.is_empty() && d != "ai.onnx")
        {
            return Err(unsupported(
                node,
                format!(
                    "operator domain '{}' is not supported",
                    node.domain.as_deref().unwrap_or("")
                ),
            ));
        }
        match node.op() {
            "Constant" => self.constant(node),
            "Identity" => {
                let value = self.get(node, 0)?.clone();
                self.set(node, 0, value);
                self.carry(node);
                Ok(())
            }
            "QuantizeLinear" => self.quantize(node),
            "DequantizeLinear" => self.dequantize(node),
            "Shape" => self.shape(node),
            "Gather" => self.gather(node),
            "Unsqueeze" | "Squeeze" => self.squeeze(node),
            "Concat" => self.concat(node),
            "ConstantOfShape" => self.constant_of_shape(node),
            "Expand" => self.expand(node),
            "Slice" => self.slice(node),
            "Transpose" => self.transpose(node),
            "Conv" => self.conv(node),
            "Relu" => self.relu(node),
            "LSTM" => self.lstm(node),
            "Gemm" => self.gemm(node),
            other => Err(unsupported(
                node,
                format!("operator '{other}' is outside the CNN+LSTM family"),
            )),
        }
    }
}

/// `f(i, c)` for every element `i` of a tensor of `dims`, `c` its index
/// along `axis` (always 0 without one: a single scale).
fn per_axis<T>(
    dims: &[usize],
    axis: Option<usize>,
    len: usize,
    f: impl Fn(usize, usize) -> T,
) -> Vec<T> {
    let Some(axis) = axis else {
        return (0..len).map(|i| f(i, 0)).collect();
    };
    let inner = dims.iter().skip(axis + 1).product::<usize>().max(1);
    let size = dims.get(axis).copied().unwrap_or(1).max(1);
    (0..len).map(|i| f(i, (i / inner) % size)).collect()
}

fn normalise_axis(node: &NodeProto, axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(unsupported(
            node,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::onnx::ModelProto;

    fn qdq_graph() -> GraphProto {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/models/cnn_lstm_qdq/model.onnx"
        );
        let bytes = std::fs::read(path).unwrap_or_default();
        ModelProto::decode(&bytes[..])
            .ok()
            .and_then(|m| m.graph)
            .unwrap_or_default()
    }

    #[test]
    fn the_qdq_fixture_becomes_int8_convs_and_gemms_around_fp32_lstms() {
        let plan = recognise(&qdq_graph()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.precision, Precision::Int8);
        let int8 = |low: Option<&LowMat>| matches!(low, Some(LowMat::Int8(q)) if q.act.is_some());
        match plan.seq.as_slice() {
            [
                SeqLayer::Conv(c0),
                SeqLayer::Conv(c1),
                SeqLayer::Lstm(l0),
                SeqLayer::Lstm(l1),
            ] => {
                assert!(c0.low_taps.is_empty(), "the first conv was excluded");
                assert_eq!(c1.low_taps.len(), 3);
                assert!(c1.low_taps.iter().all(|t| int8(Some(t))));
                assert!(l0.w_low.is_none() && l1.r_low.is_none());
            }
            other => panic!("unexpected layers: {}", other.len()),
        }
        assert!(plan.head.iter().all(|h| int8(h.low.as_ref())));
        // The second conv's output is rounded for the fp32 LSTM reading it.
        assert_eq!(
            plan.output_quant
                .iter()
                .map(|(at, _)| *at)
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn a_dequantize_with_another_scale_than_its_quantize_is_refused() {
        let mut graph = qdq_graph();
        let dq = graph
            .node
            .iter_mut()
            .find(|n| {
                n.op() == "DequantizeLinear"
                    && n.input
                        .first()
                        .is_some_and(|i| i.ends_with("_QuantizeLinear_Output"))
            })
            .unwrap_or_else(|| panic!("no activation DequantizeLinear"));
        dq.input[1] = "/Gather_output_0_scale".into();
        let err = recognise(&graph).err().unwrap_or_default();
        assert!(
            err.contains("DequantizeLinear node") && err.contains("its QuantizeLinear's scale"),
            "{err}"
        );
    }
}
