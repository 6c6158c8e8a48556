//! Pruning a CNN+LSTM ONNX model: an offline rewrite of its weights.
//!
//! Two transforms, applied in this order to a decoded [`ModelProto`]:
//!
//! 1. **Structured L2 channel pruning** (`channels`, a fraction): for each
//!    Conv1d, in graph order, the output channels whose filters
//!    (`W[o, :, :]`) have the smallest L2 norm are removed, with their bias
//!    entries. The removed channels are then removed from whatever reads
//!    them: the pruner follows the conv's output through the
//!    channel-preserving nodes of the family (`Relu`, `Identity`,
//!    `Transpose`, and `Shape`, which only reads the batch size) to the next
//!    `Conv` (its input-channel axis shrinks) or the first `LSTM` (its input
//!    weight columns shrink). The model gets narrower, so it does less work
//!    in every engine. Anything else on that path (a BatchNorm, a Gemm, the
//!    graph output) stops the pruner with an error naming the node: the
//!    family the export script produces has none, and a per-channel op the
//!    pruner did not shrink would make an invalid model.
//! 2. **L1 unstructured magnitude pruning** (`sparsity`, a fraction): in
//!    every Conv and Gemm weight tensor, separately, the `round(sparsity ·
//!    n)` weights of smallest magnitude are set to zero. The shapes do not
//!    change, and the dense kernels do not skip zeros: this makes the file
//!    compress better and prepares fine-tuning, not faster inference.
//!
//! The model's metadata records what was done under
//! [`tickserve_engine::PRUNING_METADATA_KEY`] (`"l1=0.30,channels=0.25"`);
//! engines append it to their variant. Pruning without fine-tuning
//! afterwards costs accuracy; fine-tuning is left to the user
//! (docs/optimization.md).

use std::collections::HashSet;

use serde::Serialize;

use crate::ToolError;
use crate::onnx::{self, FloatTensor, GraphProto, ModelProto, NodeProto};

/// How much to prune.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneOptions {
    /// Fraction of each Conv/Gemm weight tensor set to zero (L1), 0 to <1.
    pub sparsity: f64,
    /// Fraction of each Conv1d's output channels removed (L2), 0 to <1.
    pub channels: f64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            sparsity: 0.3,
            channels: 0.0,
        }
    }
}

impl PruneOptions {
    /// The metadata record: `"l1=0.30,channels=0.25"`.
    pub fn record(&self) -> String {
        format!("l1={:.2},channels={:.2}", self.sparsity, self.channels)
    }

    fn check(&self) -> Result<(), ToolError> {
        for (name, value) in [("sparsity", self.sparsity), ("channels", self.channels)] {
            if !(0.0..1.0).contains(&value) {
                return Err(ToolError::InvalidArgument(format!(
                    "--{name} is {value}; expected a fraction from 0 to below 1"
                )));
            }
        }
        Ok(())
    }
}

/// What pruning did to one weight tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    /// The node that reads the weights (`Conv node '/conv/conv.0/Conv'`).
    pub node: String,
    /// The initializer's name.
    pub weight: String,
    pub dims_before: Vec<usize>,
    pub dims_after: Vec<usize>,
    /// Output channels removed from this layer (structured pruning).
    pub channels_removed: usize,
    /// Zero weights after pruning…
    pub zeros: usize,
    /// …out of this many.
    pub weights: usize,
}

impl LayerReport {
    /// Fraction of zero weights.
    pub fn sparsity(&self) -> f64 {
        if self.weights == 0 {
            0.0
        } else {
            self.zeros as f64 / self.weights as f64
        }
    }
}

/// What [`prune`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneReport {
    /// The record written to the model's metadata (earlier records of a
    /// model pruned twice come first, separated by `;`).
    pub record: String,
    /// Every weight tensor pruned or shrunk, in graph order.
    pub layers: Vec<LayerReport>,
}

/// Prunes `model` in place and records it in the metadata.
pub fn prune(model: &mut ModelProto, options: &PruneOptions) -> Result<PruneReport, ToolError> {
    options.check()?;
    let graph = onnx::graph_mut(model)?;
    let mut layers = Vec::new();
    let mut weighted = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if matches!(node.op_type.as_deref(), Some("Conv" | "Gemm")) {
            let weight = node.input.get(1).cloned().unwrap_or_default();
            let tensor = onnx::read_float(graph, &weight)
                .map_err(|e| ToolError::Prune(format!("{}: {e}", onnx::describe(node))))?;
            if onnx::uses(graph, &weight) != 1 {
                return Err(ToolError::Prune(format!(
                    "{}: its weights '{weight}' are shared with another node",
                    onnx::describe(node)
                )));
            }
            weighted.push(index);
            layers.push(LayerReport {
                node: onnx::describe(node),
                weight,
                dims_before: tensor.dims,
                dims_after: Vec::new(),
                channels_removed: 0,
                zeros: 0,
                weights: 0,
            });
        }
    }
    if weighted.is_empty() {
        return Err(ToolError::Prune(
            "the model has no Conv or Gemm layer to prune".into(),
        ));
    }
    if options.channels > 0.0 {
        let convs: Vec<usize> = weighted
            .iter()
            .copied()
            .filter(|&i| graph.node[i].op_type.as_deref() == Some("Conv"))
            .collect();
        for conv in convs {
            prune_channels(graph, conv, options.channels, &mut layers)?;
        }
    }
    if options.sparsity > 0.0 {
        for &index in &weighted {
            let name = graph.node[index].input[1].clone();
            let mut tensor = onnx::read_float(graph, &name)?;
            zero_smallest(&mut tensor.values, options.sparsity);
            onnx::write_float(graph, &name, &tensor)?;
        }
    }
    for layer in &mut layers {
        let tensor = onnx::read_float(graph, &layer.weight)?;
        layer.zeros = tensor.values.iter().filter(|&&v| v == 0.0).count();
        layer.weights = tensor.len();
        layer.dims_after = tensor.dims;
    }
    let record = match onnx::metadata(model, tickserve_engine::PRUNING_METADATA_KEY) {
        Some(earlier) if !earlier.is_empty() => format!("{earlier};{}", options.record()),
        _ => options.record(),
    };
    onnx::set_metadata(
        model,
        tickserve_engine::PRUNING_METADATA_KEY,
        record.clone(),
    );
    Ok(PruneReport { record, layers })
}

/// Prunes the ONNX file `bytes`, returning the new file's bytes.
pub fn prune_bytes(
    bytes: &[u8],
    options: &PruneOptions,
) -> Result<(Vec<u8>, PruneReport), ToolError> {
    let mut model = onnx::decode(bytes)?;
    let report = prune(&mut model, options)?;
    Ok((onnx::encode(&model), report))
}

/// Sets the `round(fraction · n)` values of smallest magnitude to zero
/// (ties broken by position, so the result is deterministic).
fn zero_smallest(values: &mut [f32], fraction: f64) {
    let n = values.len();
    let k = ((fraction * n as f64).round() as usize).min(n);
    if k == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b))
    });
    for &i in &order[..k] {
        values[i] = 0.0;
    }
}

fn report_for<'a>(
    layers: &'a mut Vec<LayerReport>,
    node: &NodeProto,
    weight: &str,
    dims: &[usize],
) -> &'a mut LayerReport {
    let index = match layers.iter().position(|l| l.weight == weight) {
        Some(index) => index,
        None => {
            layers.push(LayerReport {
                node: onnx::describe(node),
                weight: weight.to_string(),
                dims_before: dims.to_vec(),
                dims_after: Vec::new(),
                channels_removed: 0,
                zeros: 0,
                weights: 0,
            });
            layers.len() - 1
        }
    };
    &mut layers[index]
}

/// The axis that holds the input channels of a Conv's weights
/// (`[out, in, kernel]`) or an LSTM's (`[directions, 4·hidden, in]`); it is
/// also the channel axis of the layer's input activations (`[batch,
/// channels, time]` and `[time, batch, channels]`), so a pruned channel
/// reaches the weights only along it.
fn input_channel_axis(op: &str) -> usize {
    if op == "Conv" { 1 } else { 2 }
}

/// Keeps, along axis `axis` of `tensor`, only the indices in `keep`.
fn keep_along(tensor: &FloatTensor, axis: usize, keep: &[usize]) -> FloatTensor {
    let outer: usize = tensor.dims[..axis].iter().product();
    let size = tensor.dims[axis];
    let inner: usize = tensor.dims[axis + 1..].iter().product();
    let mut values = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let start = (o * size + k) * inner;
            values.extend_from_slice(&tensor.values[start..start + inner]);
        }
    }
    let mut dims = tensor.dims.clone();
    dims[axis] = keep.len();
    FloatTensor { dims, values }
}

/// Removes the `round(fraction · c_out)` weakest output channels of the
/// Conv node `index`, and their inputs in every layer that reads them.
fn prune_channels(
    graph: &mut GraphProto,
    index: usize,
    fraction: f64,
    layers: &mut Vec<LayerReport>,
) -> Result<(), ToolError> {
    let node = graph.node[index].clone();
    let fail = |why: String| ToolError::Prune(format!("{}: {why}", onnx::describe(&node)));
    if onnx::attr_int(&node, "group").unwrap_or(1) != 1 {
        return Err(fail("grouped convolutions cannot be channel-pruned".into()));
    }
    let weight_name = node.input[1].clone();
    let weights = onnx::read_float(graph, &weight_name)?;
    let [cout, cin, kernel] = weights.dims[..] else {
        return Err(fail(format!(
            "weights of shape {:?} are not a Conv1d's [out, in, kernel]",
            weights.dims
        )));
    };
    let remove = ((fraction * cout as f64).round() as usize).min(cout - 1);
    if remove == 0 {
        return Ok(());
    }
    let filter = cin * kernel;
    let norms: Vec<f64> = (0..cout)
        .map(|o| {
            weights.values[o * filter..(o + 1) * filter]
                .iter()
                .map(|&w| f64::from(w) * f64::from(w))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut order: Vec<usize> = (0..cout).collect();
    order.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]).then(a.cmp(&b)));
    let mut keep = order[remove..].to_vec();
    keep.sort_unstable();

    onnx::write_float(graph, &weight_name, &keep_along(&weights, 0, &keep))?;
    report_for(layers, &node, &weight_name, &weights.dims).channels_removed += remove;
    if let Some(bias_name) = node.input.get(2).filter(|b| !b.is_empty()) {
        if onnx::uses(graph, bias_name) != 1 {
            return Err(fail(format!(
                "its bias '{bias_name}' is shared with another node"
            )));
        }
        let bias = onnx::read_float(graph, bias_name)?;
        if bias.dims != [cout] {
            return Err(fail(format!("bias of shape {:?}", bias.dims)));
        }
        onnx::write_float(graph, bias_name, &keep_along(&bias, 0, &keep))?;
    }

    // Follow the output to the layers that read its channels. The channel
    // axis moves with every Transpose.
    let mut pending = vec![(node.output[0].clone(), 1usize)];
    let mut reached = HashSet::new();
    let mut shrunk = 0;
    while let Some((value, axis)) = pending.pop() {
        if !reached.insert(value.clone()) {
            continue;
        }
        if graph
            .output
            .iter()
            .any(|o| o.name.as_deref() == Some(&value))
        {
            return Err(fail(format!(
                "its channels reach the graph output '{value}' unchanged"
            )));
        }
        let readers: Vec<(usize, usize)> = graph
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.input
                    .iter()
                    .enumerate()
                    .filter(|(_, name)| **name == value)
                    .map(move |(position, _)| (i, position))
            })
            .collect();
        for (reader, position) in readers {
            let next = graph.node[reader].clone();
            let op = next.op_type.as_deref().unwrap_or("");
            let cannot = || {
                fail(format!(
                    "its channels reach {} (input {position}), which the pruner cannot shrink; it follows them through Relu, Identity and Transpose to a Conv or an LSTM",
                    onnx::describe(&next)
                ))
            };
            match (op, position) {
                ("Relu" | "Identity", 0) => pending.push((next.output[0].clone(), axis)),
                ("Transpose", 0) => {
                    let perm = onnx::attr_ints(&next, "perm").ok_or_else(cannot)?;
                    let moved = perm
                        .iter()
                        .position(|&p| p == axis as i64)
                        .ok_or_else(cannot)?;
                    pending.push((next.output[0].clone(), moved));
                }
                ("Shape", 0) => {}
                ("Conv" | "LSTM", 0) if axis == input_channel_axis(op) => {
                    let name = next.input[1].clone();
                    let w = onnx::read_float(graph, &name)?;
                    if w.dims.len() != 3 || w.dims[axis] != cout || onnx::uses(graph, &name) != 1 {
                        return Err(cannot());
                    }
                    onnx::write_float(graph, &name, &keep_along(&w, axis, &keep))?;
                    report_for(layers, &next, &name, &w.dims);
                    shrunk += 1;
                }
                _ => return Err(cannot()),
            }
        }
    }
    if shrunk == 0 {
        return Err(fail(
            "no Conv or LSTM reads its output, so its channels cannot be removed".into(),
        ));
    }
    // Shapes recorded for the narrowed values are stale now; they are
    // optional hints, so drop them rather than leave them wrong.
    graph
        .value_info
        .retain(|v| !v.name.as_deref().is_some_and(|n| reached.contains(n)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_magnitudes_are_zeroed_deterministically() {
        let mut v = vec![0.5, -0.1, 0.3, 0.1, -0.7, 0.2];
        zero_smallest(&mut v, 0.5);
        // |−0.1| and |0.1| tie: both go, then 0.2.
        assert_eq!(v, vec![0.5, 0.0, 0.3, 0.0, -0.7, 0.0]);
        let mut w = vec![1.0, 2.0];
        zero_smallest(&mut w, 0.0);
        assert_eq!(w, vec![1.0, 2.0]);
    }

    #[test]
    fn keep_along_an_axis_selects_slices() {
        let t = FloatTensor {
            dims: vec![2, 3, 2],
            values: (0..12).map(|v| v as f32).collect(),
        };
        let k = keep_along(&t, 1, &[0, 2]);
        assert_eq!(k.dims, vec![2, 2, 2]);
        assert_eq!(k.values, vec![0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 10.0, 11.0]);
        let k = keep_along(&t, 0, &[1]);
        assert_eq!(k.values, (6..12).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn fractions_outside_zero_to_one_are_refused() {
        for options in [
            PruneOptions {
                sparsity: 1.0,
                channels: 0.0,
            },
            PruneOptions {
                sparsity: 0.3,
                channels: -0.1,
            },
        ] {
            assert!(options.check().is_err());
        }
        assert_eq!(PruneOptions::default().record(), "l1=0.30,channels=0.00");
    }
}
