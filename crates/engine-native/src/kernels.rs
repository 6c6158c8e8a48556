//! Dense kernels of the native engine: a bounds-checked row-major GEMM over
//! the `gemm` crate, and the fused LSTM cell update.
//!
//! Every layer of the CNN+LSTM family reduces to GEMMs (convolution taps,
//! the LSTM input projection for all time steps, the recurrent product, the
//! head) plus element-wise work, so this is the whole numeric core.

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, all row-major with the given row
/// strides (column stride 1). With `accumulate` the product is added to
/// `dst`; otherwise `dst` is overwritten.
///
/// # Panics
/// If a stride or slice length would let the GEMM read or write out of
/// bounds. The engine computes every shape from the validated plan, so a
/// panic here is a bug, never a property of a request.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && lhs_rs >= k && rhs_rs >= n, "GEMM strides");
    assert!(dst.len() >= (m - 1) * dst_rs + n, "GEMM dst bounds");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_rs..row * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(lhs.len() >= (m - 1) * lhs_rs + k, "GEMM lhs bounds");
    assert!(rhs.len() >= (k - 1) * rhs_rs + n, "GEMM rhs bounds");
    // SAFETY: the asserts above keep every element the GEMM touches,
    // `base + row * rs + col` with row < rows and col < cols, inside its
    // slice; `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One LSTM cell update for one row, gates in ONNX order (i, o, f, c):
/// `c ← σ(f)·c + σ(i)·tanh(g)`, `h ← σ(o)·tanh(c)`.
#[inline]
pub(crate) fn lstm_cell(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hidden = c.len();
    let (i, rest) = gates.split_at(hidden);
    let (o, rest) = rest.split_at(hidden);
    let (f, g) = rest.split_at(hidden);
    for j in 0..hidden {
        let cell = sigmoid(f[j]) * c[j] + sigmoid(i[j]) * g[j].tanh();
        c[j] = cell;
        h[j] = sigmoid(o[j]) * cell.tanh();
    }
}

pub(crate) fn relu_in_place(values: &mut [f32]) {
    for v in values {
        *v = v.max(0.0);
    }
}

/// Fills each of `rows` rows of width `bias.len()` (row stride `rs`) with
/// `bias`, the starting value of a GEMM that accumulates onto it.
pub(crate) fn broadcast_rows(dst: &mut [f32], rows: usize, rs: usize, bias: &[f32]) {
    for row in 0..rows {
        dst[row * rs..row * rs + bias.len()].copy_from_slice(bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| lhs[i * k + p] * rhs[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_product_and_accumulates() {
        let (m, n, k) = (5, 7, 3);
        let lhs: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 3.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|v| (v as f32).sin()).collect();
        let expected = naive(m, n, k, &lhs, &rhs);
        let mut dst = vec![9.0; m * n];
        matmul(m, n, k, &mut dst, n, false, &lhs, k, &rhs, n);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        matmul(m, n, k, &mut dst, n, true, &lhs, k, &rhs, n);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - 2.0 * b).abs() < 1e-4);
        }
    }

    #[test]
    fn matmul_respects_row_strides() {
        // dst rows 10 apart, only the first 2 columns written.
        let lhs = [1.0, 2.0, 3.0, 4.0];
        let rhs = [1.0, 0.0, 0.0, 1.0];
        let mut dst = vec![-1.0; 12];
        matmul(2, 2, 2, &mut dst, 10, false, &lhs, 2, &rhs, 2);
        assert_eq!(&dst[0..2], &[1.0, 2.0]);
        assert_eq!(&dst[2..10], &[-1.0; 8]);
        assert_eq!(&dst[10..12], &[3.0, 4.0]);
    }

    #[test]
    fn lstm_cell_matches_the_textbook_formula() {
        let gates = [0.3, -0.2, 0.5, 1.0]; // i, o, f, g for hidden 1
        let mut c = [0.7];
        let mut h = [0.0];
        lstm_cell(&gates, &mut c, &mut h);
        let expected_c = sigmoid(0.5) * 0.7 + sigmoid(0.3) * 1.0f32.tanh();
        assert!((c[0] - expected_c).abs() < 1e-7);
        assert!((h[0] - sigmoid(-0.2) * expected_c.tanh()).abs() < 1e-7);
    }
}
