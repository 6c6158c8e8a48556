//! QuantizeLinear/DequantizeLinear handling for QDQ models (see the
//! module doc of `recognise`): the activation roundings carried through
//! the graph, and the int8 inputs and weights the pairs give the layers.

use super::*;

impl Recogniser {
    /// The roundings the activation read as input `index` went through.
    pub(super) fn chain(&self, node: &NodeProto, index: usize) -> Vec<ActQuant> {
        node.input_name(index)
            .and_then(|name| self.rounding.get(name))
            .cloned()
            .unwrap_or_default()
    }

    /// Passes input 0's roundings on to output 0 (ops that move values
    /// without changing them).
    pub(super) fn carry(&mut self, node: &NodeProto) {
        let chain = self.chain(node, 0);
        if let Some(out) = node.output.first().filter(|_| !chain.is_empty()) {
            self.rounding.insert(out.clone(), chain);
        }
    }

    /// An fp32 reader (`node`) sees the last layer's output rounded by
    /// `chain`: record the roundings on that layer.
    pub(super) fn round_last_output(
        &mut self,
        node: &NodeProto,
        chain: &[ActQuant],
    ) -> Result<(), String> {
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
    pub(super) fn int8_input(
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
    pub(super) fn qparams(&self, node: &NodeProto) -> Result<(Vec<f32>, Vec<i64>, i32), String> {
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
    pub(super) fn act_quant(&self, node: &NodeProto) -> Result<ActQuant, String> {
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
    pub(super) fn q_axis(
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

    pub(super) fn quantize(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn dequantize(&mut self, node: &NodeProto) -> Result<(), String> {
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
