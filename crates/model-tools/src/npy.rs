//! Validation sets and reference outputs as `.npy` files (float32, the
//! first axis is the sample), read with npyz.

use std::path::{Path, PathBuf};

use crate::ToolError;

/// Rows of float32 values: `shape[0]` samples of `shape[1..]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub path: PathBuf,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Dataset {
    /// Number of samples.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Values per sample.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Per-sample dims.
    pub fn row_dims(&self) -> &[usize] {
        self.shape.get(1..).unwrap_or(&[])
    }
}

/// Reads a float32 `.npy` file with at least one sample.
pub fn read(path: &Path) -> Result<Dataset, ToolError> {
    let bytes = std::fs::read(path).map_err(ToolError::io(path))?;
    let bad = |reason: String| ToolError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(e.to_string()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() != npyz::Order::C {
        return Err(bad("Fortran-order arrays are not supported".into()));
    }
    let values: Vec<f32> = npy
        .into_vec::<f32>()
        .map_err(|e| bad(format!("expected float32 values: {e}")))?;
    if shape.is_empty() || shape[0] == 0 {
        return Err(bad(format!(
            "shape {shape:?}: expected [samples, ...] with at least one sample"
        )));
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        shape,
        values,
    })
}
