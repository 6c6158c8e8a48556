//! The cache key: a 128-bit xxh3 hash of everything that decides a row's
//! answer.
//!
//! Triton hashes model name, version and the raw input bytes only
//! (serving-systems.md §2.3), so two requests with the same bytes but a
//! different shape or datatype would share an entry. Here every field is
//! hashed, each length-prefixed so no two field sequences can produce the
//! same byte stream:
//!
//! ```text
//! "tickserve-cache-key/v2"
//! model name, model version (u64 LE)
//! result-affecting request parameters (canonical JSON, sorted by name)
//! for each input, sorted by name: name, datatype, row shape (i64 LE each),
//!                                 raw little-endian bytes of the row
//! ```
//!
//! Keys are per row: a request of n rows is looked up as n keys, so rows
//! seen before in any other request (of any size) are hits.

use std::fmt;

use xxhash_rust::xxh3::Xxh3;

/// Version tag hashed first; bump it when the key layout changes so old
/// Redis entries are never read with a new meaning.
const DOMAIN: &[u8] = b"tickserve-cache-key/v2";

/// A 128-bit cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub u128);

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({:032x})", self.0)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// One input's share of one row.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    /// Shape of one row (the batch axis left out).
    pub shape: &'a [i64],
    pub data: &'a [f32],
}

fn field(hasher: &mut Xxh3, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// The key of one row of `model` version `version`, run by `variant` (the
/// engine and its precision, e.g. `native/int8`: a quantised model gives
/// different numbers). `parameters` is the canonical encoding of the
/// request parameters that can change the result (empty when there are
/// none).
pub fn row_key(
    model: &str,
    version: u64,
    variant: &str,
    parameters: &[u8],
    inputs: &mut [KeyInput<'_>],
) -> CacheKey {
    inputs.sort_by(|a, b| a.name.cmp(b.name));
    let mut hasher = Xxh3::new();
    field(&mut hasher, DOMAIN);
    field(&mut hasher, model.as_bytes());
    hasher.update(&version.to_le_bytes());
    field(&mut hasher, variant.as_bytes());
    field(&mut hasher, parameters);
    hasher.update(&(inputs.len() as u64).to_le_bytes());
    let mut buffer = [0u8; 4 * 256];
    for input in inputs.iter() {
        field(&mut hasher, input.name.as_bytes());
        field(&mut hasher, input.datatype.as_bytes());
        hasher.update(&(input.shape.len() as u64).to_le_bytes());
        for &d in input.shape {
            hasher.update(&d.to_le_bytes());
        }
        hasher.update(&((input.data.len() * 4) as u64).to_le_bytes());
        for chunk in input.data.chunks(256) {
            for (out, v) in buffer.chunks_exact_mut(4).zip(chunk) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            hasher.update(&buffer[..chunk.len() * 4]);
        }
    }
    CacheKey(hasher.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, version: u64, params: &[u8], inputs: &[KeyInput<'_>]) -> CacheKey {
        row_key(model, version, "native/fp32", params, &mut inputs.to_vec())
    }

    #[test]
    fn every_field_changes_the_key() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let base = KeyInput {
            name: "x",
            datatype: "FP32",
            shape: &[2, 3],
            data: &data,
        };
        let k = key("m", 1, b"", &[base]);
        assert_eq!(k, key("m", 1, b"", &[base]), "deterministic");
        assert_ne!(k, key("n", 1, b"", &[base]), "model");
        assert_ne!(k, key("m", 2, b"", &[base]), "version");
        assert_ne!(k, key("m", 1, b"{\"a\":1}", &[base]), "parameters");
        assert_ne!(
            k,
            row_key("m", 1, "native/int8", b"", &mut [base]),
            "engine variant (precision)"
        );
        let shape = KeyInput {
            shape: &[3, 2],
            ..base
        };
        assert_ne!(k, key("m", 1, b"", &[shape]), "shape");
        let dtype = KeyInput {
            datatype: "FP16",
            ..base
        };
        assert_ne!(k, key("m", 1, b"", &[dtype]), "datatype");
        let name = KeyInput { name: "y", ..base };
        assert_ne!(k, key("m", 1, b"", &[name]), "input name");
        let other = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5];
        let bytes = KeyInput {
            data: &other,
            ..base
        };
        assert_ne!(k, key("m", 1, b"", &[bytes]), "data");
        // -0.0 == 0.0 as floats but not as bytes: the key follows the bytes.
        let zero = [0.0f32];
        let neg = [-0.0f32];
        let z = KeyInput {
            name: "x",
            datatype: "FP32",
            shape: &[1],
            data: &zero,
        };
        assert_ne!(
            key("m", 1, b"", &[z]),
            key("m", 1, b"", &[KeyInput { data: &neg, ..z }])
        );
    }

    #[test]
    fn input_order_does_not_matter_but_field_boundaries_do() {
        let a = [1.0f32];
        let b = [2.0f32];
        let x = KeyInput {
            name: "a",
            datatype: "FP32",
            shape: &[1],
            data: &a,
        };
        let y = KeyInput {
            name: "b",
            data: &b,
            ..x
        };
        assert_eq!(key("m", 1, b"", &[x, y]), key("m", 1, b"", &[y, x]));
        // "ab" + "" must not equal "a" + "b".
        assert_ne!(key("ab", 1, b"", &[x]), key("a", 1, b"b", &[x]));
    }
}
