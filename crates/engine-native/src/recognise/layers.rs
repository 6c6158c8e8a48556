//! The recogniser's nodes that do real work (Conv, Relu, LSTM, Gemm): each
//! checks its attributes, extracts and packs its weights from the constant
//! inputs (fp32, or int8 from a QDQ model) and appends a layer to the
//! [`Plan`].

use super::*;

impl Recogniser {
    pub(super) fn conv(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn produced(&mut self, node: &NodeProto, axes: Vec<Axis>) {
        self.last_layer_output = node.output.first().cloned();
        self.set(node, 0, Value::Act(axes));
    }

    pub(super) fn relu(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn lstm(&mut self, node: &NodeProto) -> Result<(), String> {
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

    pub(super) fn gemm(&mut self, node: &NodeProto) -> Result<(), String> {
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
