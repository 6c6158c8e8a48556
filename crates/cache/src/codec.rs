//! The value format stored in Redis: small, versioned, language-neutral.
//!
//! ```text
//! b"TSC" | format version u8 (=1) | outputs u32 LE
//! for each output: values u32 LE | values × f32 LE
//! ```
//!
//! One value is one row's answer: for each output of the model's
//! signature, that row's values. A value that does not decode (another
//! format version, a truncated write) is treated as a miss.

/// One row's answer: per output of the signature, the row's values.
pub type RowOutputs = Vec<Vec<f32>>;

const MAGIC: &[u8; 3] = b"TSC";
const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not a tickserve cache value (bad magic)")]
    Magic,
    #[error("cache value format version {0} is not supported (expected {FORMAT_VERSION})")]
    Version(u8),
    #[error("cache value is truncated or has trailing bytes")]
    Length,
}

/// Size in bytes of the encoded row.
pub fn encoded_len(row: &RowOutputs) -> usize {
    8 + row.iter().map(|o| 4 + 4 * o.len()).sum::<usize>()
}

pub fn encode(row: &RowOutputs) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(row));
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(row.len() as u32).to_le_bytes());
    for output in row {
        out.extend_from_slice(&(output.len() as u32).to_le_bytes());
        for v in output {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<RowOutputs, CodecError> {
    let (head, mut rest) = bytes.split_at_checked(8).ok_or(CodecError::Length)?;
    if &head[..3] != MAGIC {
        return Err(CodecError::Magic);
    }
    if head[3] != FORMAT_VERSION {
        return Err(CodecError::Version(head[3]));
    }
    let u32_at = |b: &[u8]| -> usize { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize };
    let outputs = u32_at(&head[4..8]);
    // Bounded by the value's own length, so a corrupt count cannot
    // allocate more than the bytes we hold.
    let mut row = Vec::with_capacity(outputs.min(rest.len() / 4));
    for _ in 0..outputs {
        let (len, tail) = rest.split_at_checked(4).ok_or(CodecError::Length)?;
        let n = u32_at(len);
        let (values, tail) = tail
            .split_at_checked(n.checked_mul(4).ok_or(CodecError::Length)?)
            .ok_or(CodecError::Length)?;
        row.push(
            values
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(CodecError::Length);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bit_exactly() {
        let row = vec![vec![0.1f32, -0.0, f32::MIN_POSITIVE], vec![], vec![7.5]];
        let bytes = encode(&row);
        assert_eq!(bytes.len(), encoded_len(&row));
        let back = decode(&bytes).unwrap();
        let bits = |r: &RowOutputs| -> Vec<Vec<u32>> {
            r.iter()
                .map(|o| o.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&back), bits(&row));
    }

    #[test]
    fn refuses_foreign_truncated_and_future_values() {
        let bytes = encode(&vec![vec![1.0, 2.0]]);
        assert_eq!(decode(b"\x80\x04pickle"), Err(CodecError::Magic));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(CodecError::Length));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(CodecError::Length));
        let mut future = bytes;
        future[3] = 2;
        assert_eq!(decode(&future), Err(CodecError::Version(2)));
    }
}
