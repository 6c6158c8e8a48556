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

use std::collections::HashMap;

use crate::kernels::{PackedMatrix, PackedRecurrent, detect_simd};
use crate::model::{Conv1d, Linear, Lstm, Plan, SeqLayer};
use crate::onnx::{ConstData, GraphProto, NodeProto, TensorProto, elem_type};
use crate::quant::{ActQuant, LowMat, Precision, QWeights};

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

    fn constant(&mut self, node: &NodeProto) -> Result<(), String> {
        let tensor = node
            .attr("value")
            .and_then(|a| a.t.as_ref())
            .ok_or_else(|| unsupported(node, "only tensor-valued Constant nodes are supported"))?;
        let value = decode_const(tensor).map_err(|e| unsupported(node, e))?;
        self.set(node, 0, Value::Const(value));
        Ok(())
    }

    fn shape(&mut self, node: &NodeProto) -> Result<(), String> {
        let dims = match self.get(node, 0)? {
            Value::Act(axes) | Value::QAct(axes, _) => {
                axes.iter().map(|&a| self.axis_size(a)).collect()
            }
            Value::Zeros(dims) => dims.clone(),
            Value::Const(c) => c.dims.iter().map(|&d| Dim::Known(d as i64)).collect(),
            Value::Shape(dims) => vec![Dim::Known(dims.len() as i64)],
        };
        // `start = 0` without `end` (written by ONNX Runtime's shape
        // inference pass) is the whole shape.
        if node.attr_int("start").unwrap_or(0) != 0 || node.attr("end").is_some() {
            return Err(unsupported(node, "Shape with start/end is not supported"));
        }
        self.set(node, 0, Value::Shape(dims));
        Ok(())
    }

    fn gather(&mut self, node: &NodeProto) -> Result<(), String> {
        let axis = node.attr_int("axis").unwrap_or(0);
        let index_value = self.get(node, 1)?.clone();
        let (index_dims, indices) = match index_value {
            Value::Const(Const {
                dims,
                data: ConstData::Int(v),
                ..
            }) => (dims, v),
            _ => return Err(unsupported(node, "indices must be an integer constant")),
        };
        match self.get(node, 0)?.clone() {
            Value::Shape(dims) => {
                let picked = indices
                    .iter()
                    .map(|&i| {
                        let i = if i < 0 { i + dims.len() as i64 } else { i };
                        dims.get(i as usize)
                            .copied()
                            .ok_or_else(|| unsupported(node, "index out of range"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.set(node, 0, Value::Shape(picked));
                Ok(())
            }
            Value::Act(axes) => {
                // x[:, -1, :] on the time axis: the "last time step" stage.
                let axis = normalise_axis(node, axis, axes.len())?;
                let last = self.time as i64 - 1;
                let is_last = index_dims.is_empty()
                    && matches!(indices.as_slice(), [i] if *i == -1 || *i == last);
                if axes[axis] != Axis::Time || !is_last {
                    return Err(unsupported(
                        node,
                        "only taking the last time step (index -1 on the time axis) is supported",
                    ));
                }
                self.last_step(node, axes, axis)
            }
            _ => Err(unsupported(node, "gathers from an unsupported tensor")),
        }
    }

    fn last_step(
        &mut self,
        node: &NodeProto,
        mut axes: Vec<Axis>,
        axis: usize,
    ) -> Result<(), String> {
        if self.stage != Stage::Lstm {
            return Err(unsupported(
                node,
                "the last time step must follow the LSTM layers",
            ));
        }
        axes.remove(axis);
        if axes != [Axis::Batch, Axis::Channel] {
            return Err(unsupported(
                node,
                format!("leaves axes {axes:?}, expected [batch, channels]"),
            ));
        }
        self.stage = Stage::Head;
        self.last_layer_output = None;
        self.set(node, 0, Value::Act(axes));
        self.carry(node);
        Ok(())
    }

    fn squeeze(&mut self, node: &NodeProto) -> Result<(), String> {
        let unsqueeze = node.op() == "Unsqueeze";
        let axes_list = match node.attr_ints("axes") {
            Some(a) => a.to_vec(),
            None => self.int_list(node, 1)?,
        };
        match self.get(node, 0)?.clone() {
            Value::Shape(dims) if unsqueeze && axes_list == [0] && dims.len() == 1 => {
                // Scalar-to-1-D in shape arithmetic: our shape values are
                // already lists.
                self.set(node, 0, Value::Shape(dims));
                Ok(())
            }
            Value::Shape(dims) if !unsqueeze && dims.len() == 1 => {
                self.set(node, 0, Value::Shape(dims));
                Ok(())
            }
            Value::Const(c) => {
                let mut dims = c.dims.clone();
                if unsqueeze {
                    let mut sorted = axes_list.clone();
                    sorted.sort_unstable();
                    for a in sorted {
                        let a = normalise_axis(node, a, dims.len() + 1)?;
                        dims.insert(a, 1);
                    }
                } else {
                    dims.retain(|&d| d != 1);
                }
                self.set(
                    node,
                    0,
                    Value::Const(Const {
                        dims,
                        data: c.data,
                        elem: c.elem,
                    }),
                );
                Ok(())
            }
            Value::Zeros(mut dims) if !unsqueeze => {
                let mut idx: Vec<usize> = axes_list
                    .iter()
                    .map(|&a| normalise_axis(node, a, dims.len()))
                    .collect::<Result<_, _>>()?;
                idx.sort_unstable();
                for a in idx.into_iter().rev() {
                    dims.remove(a);
                }
                self.set(node, 0, Value::Zeros(dims));
                Ok(())
            }
            Value::Act(mut axes) if !unsqueeze => {
                let mut idx: Vec<usize> = axes_list
                    .iter()
                    .map(|&a| normalise_axis(node, a, axes.len()))
                    .collect::<Result<_, _>>()?;
                idx.sort_unstable();
                for a in idx.into_iter().rev() {
                    if axes[a] != Axis::Direction {
                        return Err(unsupported(
                            node,
                            "only the LSTM's direction axis can be squeezed",
                        ));
                    }
                    axes.remove(a);
                }
                self.set(node, 0, Value::Act(axes));
                self.carry(node);
                Ok(())
            }
            _ => Err(unsupported(node, "is applied to an unsupported tensor")),
        }
    }

    fn concat(&mut self, node: &NodeProto) -> Result<(), String> {
        let mut dims = Vec::new();
        for i in 0..node.input.len() {
            dims.extend(self.shape_list(node, i)?);
        }
        self.set(node, 0, Value::Shape(dims));
        Ok(())
    }

    fn constant_of_shape(&mut self, node: &NodeProto) -> Result<(), String> {
        let dims = self.shape_list(node, 0)?;
        let zero = match node.attr("value").and_then(|a| a.t.as_ref()) {
            None => true,
            Some(t) => match t.decode() {
                Ok(ConstData::Float(v)) => v.iter().all(|&x| x == 0.0),
                Ok(ConstData::Int(v)) => v.iter().all(|&x| x == 0),
                Err(_) => false,
            },
        };
        if !zero {
            return Err(unsupported(node, "only zero-filled tensors are supported"));
        }
        self.set(node, 0, Value::Zeros(dims));
        Ok(())
    }

    fn expand(&mut self, node: &NodeProto) -> Result<(), String> {
        let zero = match self.get(node, 0)? {
            Value::Const(Const {
                data: ConstData::Float(v),
                ..
            }) => v.iter().all(|&x| x == 0.0),
            Value::Zeros(_) => true,
            _ => false,
        };
        if !zero {
            return Err(unsupported(
                node,
                "only expanding zeros (initial LSTM states) is supported",
            ));
        }
        let dims = self.shape_list(node, 1)?;
        self.set(node, 0, Value::Zeros(dims));
        Ok(())
    }

    fn slice(&mut self, node: &NodeProto) -> Result<(), String> {
        let source = self.get(node, 0)?.clone();
        let starts = self.int_list(node, 1)?;
        let ends = self.int_list(node, 2)?;
        let rank = match &source {
            Value::Zeros(d) | Value::Shape(d) => d.len(),
            Value::Act(a) | Value::QAct(a, _) => a.len(),
            Value::Const(c) => c.dims.len(),
        };
        let axes = match node.input_name(3) {
            Some(_) => self.int_list(node, 3)?,
            None => (0..starts.len() as i64).collect(),
        };
        if node.input_name(4).is_some() && self.int_list(node, 4)?.iter().any(|&s| s != 1) {
            return Err(unsupported(node, "only step 1 is supported"));
        }
        match source {
            Value::Zeros(mut dims) => {
                for ((&a, &s), &e) in axes.iter().zip(&starts).zip(&ends) {
                    let a = normalise_axis(node, a, rank)?;
                    let Dim::Known(size) = dims[a] else {
                        return Err(unsupported(node, "slices the batch axis"));
                    };
                    let clamp = |v: i64| {
                        if v < 0 {
                            (v + size).max(0)
                        } else {
                            v.min(size)
                        }
                    };
                    dims[a] = Dim::Known((clamp(e) - clamp(s)).max(0));
                }
                self.set(node, 0, Value::Zeros(dims));
                Ok(())
            }
            Value::Shape(dims) if axes == [0] => {
                let size = dims.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + size } else { v }).clamp(0, size) as usize;
                let picked = dims[clamp(starts[0])..clamp(ends[0]).max(clamp(starts[0]))].to_vec();
                self.set(node, 0, Value::Shape(picked));
                Ok(())
            }
            Value::Act(act_axes) => {
                // x[:, -1:, :] followed by a squeeze is also "last step", but
                // only the Gather form is produced by the exporters we know.
                let _ = act_axes;
                Err(unsupported(
                    node,
                    "slicing the activation is not supported; index the last time step with x[:, -1, :]",
                ))
            }
            _ => Err(unsupported(node, "is applied to an unsupported tensor")),
        }
    }

    fn transpose(&mut self, node: &NodeProto) -> Result<(), String> {
        let axes = self.act(node, 0)?;
        let perm: Vec<usize> = match node.attr_ints("perm") {
            Some(p) => p
                .iter()
                .map(|&p| normalise_axis(node, p, axes.len()))
                .collect::<Result<_, _>>()?,
            None => (0..axes.len()).rev().collect(),
        };
        if perm.len() != axes.len() {
            return Err(unsupported(node, "perm does not match the tensor's rank"));
        }
        let permuted = perm.iter().map(|&p| axes[p]).collect();
        self.set(node, 0, Value::Act(permuted));
        self.carry(node);
        Ok(())
    }

    fn conv(&mut self, node: &NodeProto) -> Result<(), String> {
        let axes = self.act(node, 0)?;
        if axes != [Axis::Batch, Axis::Channel, Axis::Time] {
            return Err(unsupported(
                node,
                format!("Conv needs a [batch, channels, time] input, found axes {axes:?}"),
            ));
        }
        if self.stage != Stage::Conv {
            return Err(unsupported(
                node,
                "Conv layers must come before the LSTM layers",
            ));
        }
        let (wdims, weights) = self.float_const(node, 1)?;
        let [cout, cin, kernel] = wdims.as_slice() else {
            return Err(unsupported(node, "only 1-D convolutions are supported"));
        };
        let (cout, cin, kernel) = (*cout, *cin, *kernel);
        if cin != self.channels {
            return Err(unsupported(
                node,
                format!("weights take {cin} channels, input has {}", self.channels),
            ));
        }
        if node.attr_int("group").unwrap_or(1) != 1 {
            return Err(unsupported(node, "grouped convolutions are not supported"));
        }
        for name in ["strides", "dilations"] {
            if node
                .attr_ints(name)
                .is_some_and(|v| v.iter().any(|&x| x != 1))
            {
                return Err(unsupported(
                    node,
                    format!("{name} other than 1 are not supported"),
                ));
            }
        }
        if node.attr_string("auto_pad").is_some_and(|p| p != "NOTSET") {
            return Err(unsupported(
                node,
                "auto_pad is not supported; export explicit pads",
            ));
        }
        let (pad_begin, pad_end) = match node.attr_ints("pads") {
            None => (0, 0),
            Some([b, e]) if *b >= 0 && *e >= 0 => (*b as usize, *e as usize),
            Some(p) => return Err(unsupported(node, format!("pads {p:?} are not supported"))),
        };
        if self.time + pad_begin + pad_end < kernel {
            return Err(unsupported(
                node,
                "kernel is longer than the padded sequence",
            ));
        }
        let bias = match node.input_name(2) {
            Some(_) => self.float_const(node, 2)?.1,
            None => vec![0.0; cout],
        };
        if bias.len() != cout {
            return Err(unsupported(
                node,
                "bias length does not match the output channels",
            ));
        }
        // ONNX stores [cout][cin][k]; the kernel wants one [cin][cout]
        // matrix per tap.
        let mut taps = vec![0.0f32; kernel * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for t in 0..kernel {
                    taps[(t * cin + i) * cout + o] = weights[(o * cin + i) * kernel + t];
                }
            }
        }
        let mut low_taps = Vec::new();
        if let Some((act, qw)) = self.int8_input(node)? {
            let scales = qw.scales_along(0, cout).ok_or_else(|| {
                unsupported(
                    node,
                    "int8 weights must have one scale per output channel (axis 0) or per tensor",
                )
            })?;
            for t in 0..kernel {
                let mut q = vec![0i8; cin * cout];
                for o in 0..cout {
                    for i in 0..cin {
                        q[i * cout + o] = qw.q[(o * cin + i) * kernel + t];
                    }
                }
                let mut w = QWeights::from_quantized(&q, cin, cout, &scales);
                w.act = Some(act);
                low_taps.push(LowMat::Int8(Box::new(w)));
            }
        }
        self.seq.push(SeqLayer::Conv(Conv1d {
            in_channels: cin,
            out_channels: cout,
            kernel,
            pad_begin,
            pad_end,
            packed_taps: Conv1d::pack_taps(&taps, kernel, cin, cout, detect_simd()),
            taps,
            bias,
            relu: false,
            low_taps,
        }));
        self.time = self.time + pad_begin + pad_end + 1 - kernel;
        self.channels = cout;
        self.produced(node, axes);
        Ok(())
    }

    fn produced(&mut self, node: &NodeProto, axes: Vec<Axis>) {
        self.last_layer_output = node.output.first().cloned();
        self.set(node, 0, Value::Act(axes));
    }

    fn relu(&mut self, node: &NodeProto) -> Result<(), String> {
        let axes = self.act(node, 0)?;
        let input = node.input_name(0).unwrap_or_default();
        if self.last_layer_output.as_deref() != Some(input) {
            return Err(unsupported(
                node,
                "ReLU must directly follow a Conv or Gemm layer",
            ));
        }
        match (self.seq.last_mut(), self.head.last_mut(), self.stage) {
            (_, Some(linear), Stage::Head) if !linear.relu => linear.relu = true,
            (Some(SeqLayer::Conv(conv)), _, Stage::Conv) if !conv.relu => conv.relu = true,
            _ => {
                return Err(unsupported(
                    node,
                    "ReLU must directly follow a Conv or Gemm layer",
                ));
            }
        }
        self.produced(node, axes);
        Ok(())
    }

    fn lstm(&mut self, node: &NodeProto) -> Result<(), String> {
        let axes = self.act(node, 0)?;
        let layout = node.attr_int("layout").unwrap_or(0);
        let expected = if layout == 0 {
            [Axis::Time, Axis::Batch, Axis::Channel]
        } else {
            [Axis::Batch, Axis::Time, Axis::Channel]
        };
        if axes != expected {
            return Err(unsupported(
                node,
                format!("LSTM input has axes {axes:?}, expected {expected:?} for layout {layout}"),
            ));
        }
        if self.stage > Stage::Lstm {
            return Err(unsupported(node, "LSTM after the head"));
        }
        // The LSTM runs in fp32: a QDQ pair before it rounds the previous
        // layer's output.
        let chain = self.chain(node, 0);
        self.round_last_output(node, &chain)?;
        if node
            .attr_string("direction")
            .is_some_and(|d| d != "forward")
        {
            return Err(unsupported(node, "only forward LSTMs are supported"));
        }
        if let Some(acts) = node.attr("activations") {
            let names: Vec<String> = acts
                .strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).to_lowercase())
                .collect();
            if names != ["sigmoid", "tanh", "tanh"] {
                return Err(unsupported(
                    node,
                    format!("activations {names:?} are not supported"),
                ));
            }
        }
        if node.attr("clip").is_some() {
            return Err(unsupported(node, "cell clipping is not supported"));
        }
        if node.attr_int("input_forget").unwrap_or(0) != 0 {
            return Err(unsupported(node, "input_forget is not supported"));
        }
        let hidden =
            node.attr_int("hidden_size")
                .ok_or_else(|| unsupported(node, "hidden_size is missing"))? as usize;
        let (wdims, w) = self.float_const(node, 1)?;
        let (rdims, r) = self.float_const(node, 2)?;
        let input = self.channels;
        if wdims != [1, 4 * hidden, input] || rdims != [1, 4 * hidden, hidden] {
            return Err(unsupported(
                node,
                format!(
                    "weight shapes {wdims:?} / {rdims:?} do not match input {input} and hidden {hidden}"
                ),
            ));
        }
        let bias = match node.input_name(3) {
            Some(_) => {
                let (bdims, b) = self.float_const(node, 3)?;
                if bdims != [1, 8 * hidden] {
                    return Err(unsupported(node, format!("bias shape {bdims:?}")));
                }
                (0..4 * hidden).map(|j| b[j] + b[4 * hidden + j]).collect()
            }
            None => vec![0.0; 4 * hidden],
        };
        if node.input_name(4).is_some() {
            return Err(unsupported(node, "sequence_lens is not supported"));
        }
        for (index, what) in [(5, "initial_h"), (6, "initial_c")] {
            if node.input_name(index).is_some()
                && !matches!(self.get(node, index)?, Value::Zeros(_))
            {
                return Err(unsupported(node, format!("{what} must be absent or zero")));
            }
        }
        if node.input_name(7).is_some() {
            return Err(unsupported(node, "peephole weights are not supported"));
        }
        for (index, what) in [(1, "Y_h"), (2, "Y_c")] {
            if node.output.get(index).is_some_and(|n| !n.is_empty()) {
                // Using the final states directly instead of Y's last step
                // is a valid form we have not needed yet.
                let _ = what;
            }
        }
        let transpose = |m: &[f32], rows: usize, cols: usize| {
            let mut t = vec![0.0f32; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = m[i * cols + j];
                }
            }
            t
        };
        let r_t = transpose(&r, 4 * hidden, hidden);
        let w_t = transpose(&w, 4 * hidden, input);
        self.seq.push(SeqLayer::Lstm(Lstm {
            input,
            hidden,
            w_packed: PackedMatrix::new(&w_t, input, 4 * hidden, detect_simd()),
            r_packed: PackedRecurrent::new(&r_t, hidden, detect_simd()),
            wr_packed: PackedRecurrent::with_input(&w_t, input, &r_t, hidden, detect_simd()),
            w_t,
            r_t,
            bias,
            w_low: None,
            r_low: None,
        }));
        self.stage = Stage::Lstm;
        self.channels = hidden;
        let y_axes = if layout == 0 {
            vec![Axis::Time, Axis::Direction, Axis::Batch, Axis::Channel]
        } else {
            vec![Axis::Batch, Axis::Time, Axis::Direction, Axis::Channel]
        };
        self.last_layer_output = None;
        self.set(node, 0, Value::Act(y_axes));
        for index in [1, 2] {
            if let Some(name) = node.output.get(index).filter(|n| !n.is_empty()) {
                self.values.remove(name);
            }
        }
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto) -> Result<(), String> {
        let axes = self.act(node, 0)?;
        if self.stage != Stage::Head || axes != [Axis::Batch, Axis::Channel] {
            return Err(unsupported(
                node,
                "Gemm must come after the last time step, on [batch, channels]",
            ));
        }
        if node.attr_int("transA").unwrap_or(0) != 0 {
            return Err(unsupported(node, "transA is not supported"));
        }
        if node.attr_float("alpha").unwrap_or(1.0) != 1.0
            || node.attr_float("beta").unwrap_or(1.0) != 1.0
        {
            return Err(unsupported(
                node,
                "alpha and beta other than 1 are not supported",
            ));
        }
        let (wdims, w) = self.float_const(node, 1)?;
        let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
        let (output, input) = match (wdims.as_slice(), trans_b) {
            ([o, i], true) => (*o, *i),
            ([i, o], false) => (*o, *i),
            _ => return Err(unsupported(node, "weights must be a matrix")),
        };
        if input != self.channels {
            return Err(unsupported(
                node,
                format!("weights take {input} values, input has {}", self.channels),
            ));
        }
        let w_t = if trans_b {
            let mut t = vec![0.0f32; input * output];
            for o in 0..output {
                for i in 0..input {
                    t[i * output + o] = w[o * input + i];
                }
            }
            t
        } else {
            w
        };
        let mut low = None;
        if let Some((act, qw)) = self.int8_input(node)? {
            let axis = if trans_b { 0 } else { 1 };
            let scales = qw.scales_along(axis, output).ok_or_else(|| {
                unsupported(
                    node,
                    "int8 weights must have one scale per output (or per tensor)",
                )
            })?;
            let mut q = vec![0i8; input * output];
            for o in 0..output {
                for i in 0..input {
                    q[i * output + o] = if trans_b {
                        qw.q[o * input + i]
                    } else {
                        qw.q[i * output + o]
                    };
                }
            }
            let mut w = QWeights::from_quantized(&q, input, output, &scales);
            w.act = Some(act);
            low = Some(LowMat::Int8(Box::new(w)));
        }
        let bias = match node.input_name(2) {
            Some(_) => {
                let (bdims, b) = self.float_const(node, 2)?;
                if b.len() != output || bdims.len() > 1 && bdims[0] != 1 {
                    return Err(unsupported(
                        node,
                        format!("bias of shape {bdims:?} is not a per-output vector"),
                    ));
                }
                b
            }
            None => vec![0.0; output],
        };
        self.head.push(Linear {
            input,
            output,
            w_packed: PackedMatrix::new(&w_t, input, output, detect_simd()),
            w_t,
            bias,
            relu: false,
            low,
        });
        self.channels = output;
        self.produced(node, axes);
        Ok(())
    }
}

impl Recogniser {
    /// The roundings the activation read as input `index` went through.
    fn chain(&self, node: &NodeProto, index: usize) -> Vec<ActQuant> {
        node.input_name(index)
            .and_then(|name| self.rounding.get(name))
            .cloned()
            .unwrap_or_default()
    }

    /// Passes input 0's roundings on to output 0 (ops that move values
    /// without changing them).
    fn carry(&mut self, node: &NodeProto) {
        let chain = self.chain(node, 0);
        if let Some(out) = node.output.first().filter(|_| !chain.is_empty()) {
            self.rounding.insert(out.clone(), chain);
        }
    }

    /// An fp32 reader (`node`) sees the last layer's output rounded by
    /// `chain`: record the roundings on that layer.
    fn round_last_output(&mut self, node: &NodeProto, chain: &[ActQuant]) -> Result<(), String> {
        if chain.is_empty() {
            return Ok(());
        }
        let Some(layer) = (self.seq.len() + self.head.len()).checked_sub(1) else {
            return Err(unsupported(
                node,
                "a QuantizeLinear on the model input must feed a Conv with int8 weights",
            ));
        };
        self.output_quant.extend(chain.iter().map(|q| (layer, *q)));
        Ok(())
    }

    /// For a Conv or Gemm: when its input went through a QDQ pair and its
    /// weights (input 1) are int8, the input's quantisation and the
    /// weights, after recording any earlier roundings on the last layer;
    /// otherwise `None` (the layer runs in fp32 on rounded values).
    fn int8_input(
        &mut self,
        node: &NodeProto,
    ) -> Result<Option<(ActQuant, QuantizedConst)>, String> {
        let chain = self.chain(node, 0);
        let weights = node
            .input_name(1)
            .and_then(|name| self.quantized.get(name))
            .cloned();
        match (chain.split_last(), weights) {
            (Some((act, before)), Some(weights)) => {
                self.round_last_output(node, before)?;
                self.int8_layers += 1;
                Ok(Some((*act, weights)))
            }
            _ => {
                self.round_last_output(node, &chain)?;
                Ok(None)
            }
        }
    }

    /// Scale and zero point (inputs 1 and 2) of a Q/DQ node, per tensor or
    /// per index of `axis`, and the zero point's element type.
    fn qparams(&self, node: &NodeProto) -> Result<(Vec<f32>, Vec<i64>, i32), String> {
        if node.attr_int("block_size").is_some_and(|b| b != 0) {
            return Err(unsupported(node, "blocked quantisation is not supported"));
        }
        let (_, scales) = self.float_const(node, 1)?;
        if scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(unsupported(node, "scales must be positive and finite"));
        }
        let (zeros, elem) = match node.input_name(2) {
            None => (vec![0; scales.len()], elem_type::UINT8),
            Some(_) => match self.get(node, 2)? {
                Value::Const(Const {
                    data: ConstData::Int(v),
                    elem,
                    ..
                }) => (v.clone(), *elem),
                _ => return Err(unsupported(node, "zero point must be an integer constant")),
            },
        };
        if zeros.len() != scales.len() {
            return Err(unsupported(node, "scale and zero point lengths differ"));
        }
        Ok((scales, zeros, elem))
    }

    /// The per-tensor activation quantisation of a Q/DQ node, as uint8.
    fn act_quant(&self, node: &NodeProto) -> Result<ActQuant, String> {
        let (scales, zeros, elem) = self.qparams(node)?;
        let ([scale], [zero]) = (scales.as_slice(), zeros.as_slice()) else {
            return Err(unsupported(
                node,
                "activations must be quantised per tensor (one scale)",
            ));
        };
        // int8 activations hold the same values as uint8 ones shifted by 128.
        let zero = match elem {
            elem_type::UINT8 => *zero,
            elem_type::INT8 => *zero + 128,
            _ => {
                return Err(unsupported(
                    node,
                    "activations must be quantised to uint8 or int8",
                ));
            }
        };
        if !(0..=255).contains(&zero) {
            return Err(unsupported(node, "zero point out of range"));
        }
        Ok(ActQuant {
            scale: *scale,
            zero: zero as i32,
        })
    }

    /// The axis of a per-axis Q/DQ node (default 1) for a constant of
    /// `rank`, or `None` with a single scale.
    fn q_axis(
        &self,
        node: &NodeProto,
        rank: usize,
        per_axis: bool,
    ) -> Result<Option<usize>, String> {
        if !per_axis {
            return Ok(None);
        }
        normalise_axis(node, node.attr_int("axis").unwrap_or(1), rank).map(Some)
    }

    fn quantize(&mut self, node: &NodeProto) -> Result<(), String> {
        match self.get(node, 0)?.clone() {
            Value::Act(axes) => {
                let act = self.act_quant(node)?;
                let input = node.input_name(0).unwrap_or_default().to_string();
                let was_last = self.last_layer_output.as_deref() == Some(input.as_str());
                self.set(node, 0, Value::QAct(axes, act));
                self.carry(node);
                if was_last {
                    self.last_layer_output = node.output.first().cloned();
                }
                Ok(())
            }
            // Float weights quantised in the graph (QAT exports): evaluated
            // here, ONNX's rounding (half to even) and saturation.
            Value::Const(Const {
                dims,
                data: ConstData::Float(w),
                ..
            }) => {
                let (scales, zeros, elem) = self.qparams(node)?;
                let (lo, hi) = match elem {
                    elem_type::INT8 => (-128, 127),
                    elem_type::UINT8 => (0, 255),
                    _ => return Err(unsupported(node, "only int8 and uint8 are supported")),
                };
                let axis = self.q_axis(node, dims.len(), scales.len() > 1)?;
                if axis.is_some_and(|a| dims.get(a) != Some(&scales.len())) {
                    return Err(unsupported(node, "scale length does not match the axis"));
                }
                let q = per_axis(&dims, axis, w.len(), |i, c| {
                    let v = (w[i] / scales[c]).round_ties_even() as i64 + zeros[c];
                    v.clamp(lo, hi)
                });
                self.set(
                    node,
                    0,
                    Value::Const(Const {
                        dims,
                        data: ConstData::Int(q),
                        elem,
                    }),
                );
                Ok(())
            }
            _ => Err(unsupported(
                node,
                "QuantizeLinear must read the activation or float weights",
            )),
        }
    }

    fn dequantize(&mut self, node: &NodeProto) -> Result<(), String> {
        match self.get(node, 0)?.clone() {
            Value::QAct(axes, act) => {
                if self.act_quant(node)? != act {
                    return Err(unsupported(
                        node,
                        "DequantizeLinear must use its QuantizeLinear's scale and zero point",
                    ));
                }
                let input = node.input_name(0).unwrap_or_default().to_string();
                let was_last = self.last_layer_output.as_deref() == Some(input.as_str());
                let mut chain = self.chain(node, 0);
                // Rounding twice to one grid is rounding once.
                if chain.last() != Some(&act) {
                    chain.push(act);
                }
                self.set(node, 0, Value::Act(axes));
                if let Some(out) = node.output.first() {
                    self.rounding.insert(out.clone(), chain);
                }
                if was_last {
                    self.last_layer_output = node.output.first().cloned();
                }
                Ok(())
            }
            Value::Const(Const {
                dims,
                data: ConstData::Int(q),
                elem,
            }) => {
                let (scales, zeros, _) = self.qparams(node)?;
                let axis = self.q_axis(node, dims.len(), scales.len() > 1)?;
                if axis.is_some_and(|a| dims.get(a) != Some(&scales.len())) {
                    return Err(unsupported(node, "scale length does not match the axis"));
                }
                let w = per_axis(&dims, axis, q.len(), |i, c| {
                    ((q[i] - zeros[c]) as f32) * scales[c]
                });
                if elem == elem_type::INT8 && zeros.iter().all(|&z| z == 0) {
                    let weights = QuantizedConst {
                        q: q.iter().map(|&v| v as i8).collect(),
                        scales,
                        axis: axis.unwrap_or(0),
                    };
                    if let Some(out) = node.output.first() {
                        self.quantized.insert(out.clone(), weights);
                    }
                }
                self.set(
                    node,
                    0,
                    Value::Const(Const {
                        dims,
                        data: ConstData::Float(w),
                        elem: elem_type::FLOAT,
                    }),
                );
                Ok(())
            }
            _ => Err(unsupported(
                node,
                "DequantizeLinear must read a QuantizeLinear's output or integer weights",
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
