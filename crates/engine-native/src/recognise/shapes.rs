//! The recogniser's shape and indexing nodes (Constant, Shape, Gather,
//! Squeeze, Concat, ConstantOfShape, Expand, Slice, Transpose): evaluated
//! at load on the abstract values, so they never become layers; on the
//! activation they only permute or drop logical axes.

use super::*;

impl Recogniser {
    pub(super) fn constant(&mut self, node: &NodeProto) -> Result<(), String> {
        let tensor = node
            .attr("value")
            .and_then(|a| a.t.as_ref())
            .ok_or_else(|| unsupported(node, "only tensor-valued Constant nodes are supported"))?;
        let value = decode_const(tensor).map_err(|e| unsupported(node, e))?;
        self.set(node, 0, Value::Const(value));
        Ok(())
    }

    pub(super) fn shape(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn gather(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn last_step(
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

    pub(super) fn squeeze(&mut self, node: &NodeProto) -> Result<(), String> {
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
                for a in removal_order(node, &axes_list, dims.len())? {
                    dims.remove(a);
                }
                self.set(node, 0, Value::Zeros(dims));
                Ok(())
            }
            Value::Act(mut axes) if !unsqueeze => {
                for a in removal_order(node, &axes_list, axes.len())? {
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

    pub(super) fn concat(&mut self, node: &NodeProto) -> Result<(), String> {
        let mut dims = Vec::new();
        for i in 0..node.input.len() {
            dims.extend(self.shape_list(node, i)?);
        }
        self.set(node, 0, Value::Shape(dims));
        Ok(())
    }

    pub(super) fn constant_of_shape(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn expand(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn slice(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn transpose(&mut self, node: &NodeProto) -> Result<(), String> {
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
}

/// The squeezed `axes` of a tensor of `rank` dimensions as indices, highest
/// first, so that removing them one by one leaves the indices still to
/// come valid.
fn removal_order(node: &NodeProto, axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut indices = axes
        .iter()
        .map(|&a| normalise_axis(node, a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    indices.sort_unstable();
    indices.reverse();
    Ok(indices)
}
