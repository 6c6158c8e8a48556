//! Reads the tensor `data` arrays of a JSON inference request without
//! serde's per-value machinery.
//!
//! Parsing decimal text is most of the CPU a JSON request costs the server
//! (docs/protocols.md has the measurements): serde_json reads each value
//! through its generic number path and a visitor call. [`split_request`]
//! walks the body once, finds `inputs[i].data` when it is a flat array of
//! numbers, reads it eight digits at a time, and hands back the body with
//! each such array emptied, so serde reads only the small rest (names,
//! shapes, parameters) as before. Anything else (nested arrays, strings,
//! escaped keys, malformed JSON) is left in place for serde, so errors and
//! every unusual form keep serde's behaviour.
//!
//! Each value is computed with the arithmetic serde_json uses for it (the
//! digits as one integer, to f64, then one multiplication or division by a
//! power of ten from the same table; integers straight to f32), so the bits
//! are serde's. A value outside that range (more than 19 digits, an
//! exponent past 22) is read by serde_json alone. Unlike serde's input,
//! the emptied arrays are not checked by serde, so [`number`] follows
//! JSON's number grammar exactly and refuses the array on any deviation.

use crate::codec::FlatData;

/// Powers of ten as f64, as serde_json's table has them (its table goes to
/// 10^308; exponents past 10^22 are rare and left to it).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Most decimal digits whose integer cannot overflow a u64 (serde_json
/// switches to another path only past u64).
const MAX_DIGITS: usize = 19;

/// The body of a JSON inference request with the flat number arrays of
/// `inputs[i].data` emptied, and their values by input (`None` for an
/// input whose data serde has to read).
#[derive(Debug)]
pub(crate) struct SplitRequest {
    pub(crate) rest: Vec<u8>,
    pub(crate) data: Vec<Option<Vec<f32>>>,
}

/// Splits `body` as [`SplitRequest`] says; `None` when it has no such
/// array (or is not an object), so serde should read it whole.
pub(crate) fn split_request(body: &[u8]) -> Option<SplitRequest> {
    let mut arrays: Vec<(usize, usize)> = Vec::new();
    let mut data = Vec::new();
    object(body, skip_whitespace(body, 0), |key, value| {
        if key != b"inputs" || body.get(value) != Some(&b'[') {
            return skip_value(body, value);
        }
        elements(body, value, |element| {
            let (values, end) = input(body, element, &mut arrays)?;
            data.push(values);
            Some(end)
        })
    })?;
    if arrays.is_empty() {
        return None;
    }
    let mut rest = Vec::with_capacity(
        body.len() - arrays.iter().map(|(s, e)| e - s).sum::<usize>() + 2 * arrays.len(),
    );
    let mut copied = 0;
    for (start, end) in arrays {
        rest.extend_from_slice(&body[copied..start]);
        rest.extend_from_slice(b"[]");
        copied = end;
    }
    rest.extend_from_slice(&body[copied..]);
    Some(SplitRequest { rest, data })
}

/// One element of `inputs`, at `at`: the values of its flat `data` array
/// when it is an object that has one (the array's span goes to `arrays`),
/// and where the element ends.
fn input(
    body: &[u8],
    at: usize,
    arrays: &mut Vec<(usize, usize)>,
) -> Option<(Option<Vec<f32>>, usize)> {
    if body.get(at) != Some(&b'{') {
        return Some((None, skip_value(body, at)?));
    }
    let mut read = None;
    let end = object(body, at, |key, value| {
        if key == b"data"
            && body.get(value) == Some(&b'[')
            && let Some((values, end)) = flat_array(body, value)
        {
            arrays.push((value, end));
            read = Some(values);
            return Some(end);
        }
        skip_value(body, value)
    })?;
    Some((read, end))
}

/// Walks the object at `at` (on its `{`): `on_member` gets each key and
/// where its value starts, and returns where the value ends. Returns where
/// the object ends; `None` when it is not one.
fn object(
    body: &[u8],
    at: usize,
    mut on_member: impl FnMut(&[u8], usize) -> Option<usize>,
) -> Option<usize> {
    if body.get(at) != Some(&b'{') {
        return None;
    }
    let mut at = skip_whitespace(body, at + 1);
    if body.get(at) == Some(&b'}') {
        return Some(at + 1);
    }
    loop {
        let (key, value) = member(body, at)?;
        at = skip_whitespace(body, on_member(key, value)?);
        match body.get(at) {
            Some(b',') => at = skip_whitespace(body, at + 1),
            Some(b'}') => return Some(at + 1),
            _ => return None,
        }
    }
}

/// Walks the array at `at` (on its `[`): `on_element` gets where each
/// element starts and returns where it ends. Returns where the array ends.
fn elements(
    body: &[u8],
    at: usize,
    mut on_element: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    let mut at = skip_whitespace(body, at + 1);
    if body.get(at) == Some(&b']') {
        return Some(at + 1);
    }
    loop {
        at = skip_whitespace(body, on_element(at)?);
        match body.get(at) {
            Some(b',') => at = skip_whitespace(body, at + 1),
            Some(b']') => return Some(at + 1),
            _ => return None,
        }
    }
}

/// The key of the object member at `at` (its raw bytes; a key with an
/// escape never equals a plain name, which leaves that member to serde)
/// and where its value starts.
fn member(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let end = string_end(body, at)?;
    let key = &body[at + 1..end - 1];
    let colon = skip_whitespace(body, end);
    if body.get(colon) != Some(&b':') {
        return None;
    }
    Some((key, skip_whitespace(body, colon + 1)))
}

/// Where the string starting at `at` (on its quote) ends, past the
/// closing quote.
fn string_end(body: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match body.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Where the JSON value starting at `at` ends. Only finds the end; serde
/// checks the value when it reads the rest.
fn skip_value(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => string_end(body, at),
        b'[' | b'{' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = string_end(body, i)?;
                        continue;
                    }
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            // A number or a literal: up to the next delimiter.
            let mut i = at;
            while let Some(byte) = body.get(i) {
                if matches!(byte, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                    break;
                }
                i += 1;
            }
            (i > at).then_some(i)
        }
    }
}

/// The values of the flat array of numbers starting at `at` (on its `[`),
/// each as the f32 serde's `data` reader gives, and where the array ends;
/// `None` for any other JSON value or any text that is not JSON.
// Out of line: inlined into the walk's closures, the loop below decoded
// 7–10 % slower in the decode benchmark.
#[inline(never)]
fn flat_array(text: &[u8], at: usize) -> Option<(Vec<f32>, usize)> {
    let mut at = skip_whitespace(text, at + 1);
    // At least two bytes per value ("0,"); most values take about ten.
    let mut values = Vec::with_capacity(text.len().saturating_sub(at) / 8 + 1);
    if text.get(at) == Some(&b']') {
        return Some((values, at + 1));
    }
    loop {
        let (value, end) = number(text, at)?;
        values.push(value);
        at = skip_whitespace(text, end);
        match text.get(at) {
            Some(b',') => at = skip_whitespace(text, at + 1),
            Some(b']') => return Some((values, at + 1)),
            _ => return None,
        }
    }
}

fn skip_whitespace(text: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = text.get(at) {
        at += 1;
    }
    at
}

/// Reads the digits from `at`: the mantissa they make (wrapping past 19
/// digits, which the caller checks) and where they end. Eight bytes at a
/// time where the text has them (SWAR, as fast_float does: the leading
/// digit bytes of the word, shifted to its top so the bytes below read as
/// leading zeros, combined in pairs, quads and then all eight with three
/// multiplications), without a branch per digit.
#[inline]
fn digits(text: &[u8], mut at: usize, mut mantissa: u64) -> (u64, usize) {
    while let Some(chunk) = text.get(at..at + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(bytes);
        let low = word.wrapping_sub(0x3030_3030_3030_3030);
        let high = word.wrapping_add(0x4646_4646_4646_4646);
        // The top bit of each byte that is not an ASCII digit.
        let not_digit = (low | high) & 0x8080_8080_8080_8080;
        let count = (not_digit.trailing_zeros() / 8) as usize;
        if count == 0 {
            return (mantissa, at);
        }
        let aligned = low << (64 - 8 * count);
        mantissa = mantissa
            .wrapping_mul(POW10_INT[count])
            .wrapping_add(eight_digits(aligned));
        at += count;
        if count < 8 {
            return (mantissa, at);
        }
    }
    while let Some(&byte) = text.get(at) {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(digit));
        at += 1;
    }
    (mantissa, at)
}

/// 10^n for n in 0..=8.
const POW10_INT: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// The value of the eight digit values (0–9) in the bytes of `low`, the
/// first digit in the lowest byte.
#[inline]
fn eight_digits(low: u64) -> u64 {
    const MASK: u64 = 0x0000_00FF_0000_00FF;
    const MUL1: u64 = 100 + (1_000_000 << 32);
    const MUL2: u64 = 1 + (10_000 << 32);
    let pairs = low.wrapping_mul(10).wrapping_add(low >> 8);
    ((pairs & MASK)
        .wrapping_mul(MUL1)
        .wrapping_add(((pairs >> 16) & MASK).wrapping_mul(MUL2)))
        >> 32
}

/// The number starting at `at` and where it ends; `None` when no number
/// starts there.
fn number(text: &[u8], at: usize) -> Option<(f32, usize)> {
    let start = at;
    let negative = text.get(at) == Some(&b'-');
    let int_start = at + usize::from(negative);
    let (mut mantissa, mut at) = digits(text, int_start, 0);
    let mut digit_count = at - int_start;
    // JSON: at least one integer digit, and no leading zero before another.
    if digit_count == 0 || (digit_count > 1 && text[int_start] == b'0') {
        return None;
    }
    let mut scale: i64 = 0;
    let mut integer = true;
    if text.get(at) == Some(&b'.') {
        integer = false;
        let fraction_start = at + 1;
        (mantissa, at) = digits(text, fraction_start, mantissa);
        if at == fraction_start {
            return None;
        }
        digit_count += at - fraction_start;
        scale = -((at - fraction_start) as i64);
    }
    if let Some(b'e' | b'E') = text.get(at) {
        integer = false;
        at += 1;
        let exponent_negative = text.get(at) == Some(&b'-');
        if let Some(b'+' | b'-') = text.get(at) {
            at += 1;
        }
        let exponent_start = at;
        let (exponent, end) = digits(text, at, 0);
        if end == exponent_start {
            return None;
        }
        if end - exponent_start > 4 {
            return serde_number(text, start, end);
        }
        at = end;
        scale += if exponent_negative {
            -(exponent as i64)
        } else {
            exponent as i64
        };
    }
    if digit_count > MAX_DIGITS {
        return serde_number(text, start, at);
    }
    if integer {
        // serde_json's integers: a u64, or a negative i64, each converted
        // straight to f32; "-0" and negatives past i64 go through f64.
        let value = if !negative {
            mantissa as f32
        } else {
            let negated = (mantissa as i64).wrapping_neg();
            if negated >= 0 {
                -(mantissa as f64) as f32
            } else {
                negated as f32
            }
        };
        return Some((value, at));
    }
    let Some(&power) = POW10.get(scale.unsigned_abs() as usize) else {
        return serde_number(text, start, at);
    };
    let magnitude = if scale >= 0 {
        mantissa as f64 * power
    } else {
        mantissa as f64 / power
    };
    let value = if negative { -magnitude } else { magnitude };
    Some((value as f32, at))
}

/// The number `text[start..end]` read as serde's `data` reader reads it
/// (`FlatData`: an integer straight to f32, a float through f64). `None`
/// when serde_json refuses it (out of range).
#[cold]
fn serde_number(text: &[u8], start: usize, end: usize) -> Option<(f32, usize)> {
    let FlatData(values) = serde_json::from_slice(text.get(start..end)?).ok()?;
    Some((*values.first()?, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The array `text` as [`flat_array`] reads it, when it is all of it.
    fn read(text: &str) -> Option<Vec<f32>> {
        let (values, end) = flat_array(text.as_bytes(), skip_whitespace(text.as_bytes(), 0))?;
        (skip_whitespace(text.as_bytes(), end) == text.len()).then_some(values)
    }

    fn assert_same_bits(text: &str) {
        let fast = read(text).unwrap_or_else(|| panic!("not read: {text}"));
        let slow = serde_json::from_str::<FlatData>(text).unwrap().0;
        assert_eq!(fast.len(), slow.len(), "{text}");
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i} of {text}: {a} vs {b}");
        }
    }

    #[test]
    fn edge_values_read_as_serde_reads_them() {
        for text in [
            "[]",
            " [ ] ",
            "[0]",
            "[-0]",
            "[0.0]",
            "[-0.0]",
            "[1, -1, 2.5, -3.25e0, 4E+1, 5e-1, 6.0E-2]",
            "[ 1 ,\n\t2\r, 3 ]",
            "[9007199254740992, 9007199254740993, -9007199254740993]",
            "[18446744073709551615, -9223372036854775808, -9223372036854775809]",
            "[123456789012345678901234, -123456789012345678901234]",
            "[0.1, 0.2, 0.30000000000000004, 0.10000000149011612]",
            "[1e22, 1e23, 1e-22, 1e-23, 1.5e300, 1e-400, 3.4028235e38, 3.5e38]",
            "[1.401298464324817e-45, 7e-46, 1.1754943508222875e-38]",
            "[0.000000000000000000001, 100000000000000000000.5]",
            "[123456789.123456789, -0.0000123, 1E5, 1e0005, 1e+00005]",
            "[12345678, 123456789, 1234567890123456789, 0.12345678, 1.23456789]",
        ] {
            assert_same_bits(text);
        }
    }

    #[test]
    fn random_values_in_every_text_form_read_as_serde_reads_them() {
        // A fixed xorshift stream: f32 bit patterns printed shortest (as
        // most clients do), widened to f64 (as Python does), with
        // exponents, and integers.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parts = Vec::new();
        while parts.len() < 50_000 {
            let bits = next();
            let any = f32::from_bits(bits as u32);
            if !any.is_finite() {
                continue;
            }
            // Magnitudes from 2^-20 to 2^19, where feature values live.
            let exponent = ((bits >> 40) as u32 % 40 + 107) << 23;
            let typical = f32::from_bits((bits as u32 & 0x807F_FFFF) | exponent);
            parts.push(format!("{any:?}"));
            parts.push(format!("{typical:?}"));
            parts.push(format!("{:?}", f64::from(typical)));
            parts.push(format!("{typical:e}"));
            parts.push(format!("{}", (bits >> 11) as i64 - (1 << 52)));
        }
        assert_same_bits(&format!("[{}]", parts.join(",")));
    }

    #[test]
    fn anything_but_a_flat_array_of_json_numbers_is_refused() {
        for text in [
            "[[1, 2], [3, 4]]",
            "[1, [2]]",
            "[\"a\"]",
            "[1, null]",
            "[true]",
            "{\"a\": 1}",
            "1",
            "[1, 2",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[01]",
            "[-01]",
            "[1.]",
            "[.5]",
            "[-]",
            "[+1]",
            "[1e]",
            "[1e+]",
            "[NaN]",
            "[Infinity]",
            "[1e400]",
        ] {
            assert_eq!(read(text), None, "{text}");
        }
    }

    #[test]
    fn a_request_splits_into_its_flat_arrays_and_the_rest() {
        let body = br#"{"id":"a \"data\":[9]","inputs":[{"name":"x","data":[1,2.5],"shape":[2]},{"name":"y","data":[[3],[4]]},{"d\u0061ta":[5]},7,{"data":[-6e1]}],"parameters":{"data":[8]}}"#;
        let split = split_request(body).expect("split");
        assert_eq!(
            String::from_utf8(split.rest).unwrap(),
            r#"{"id":"a \"data\":[9]","inputs":[{"name":"x","data":[],"shape":[2]},{"name":"y","data":[[3],[4]]},{"d\u0061ta":[5]},7,{"data":[]}],"parameters":{"data":[8]}}"#
        );
        assert_eq!(
            split.data,
            vec![Some(vec![1.0, 2.5]), None, None, None, Some(vec![-60.0])]
        );
    }

    #[test]
    fn bodies_without_a_flat_array_are_left_whole() {
        for body in [
            &br#"{"inputs":[{"name":"x","data":[[1]]}]}"#[..],
            br#"{"inputs":[]}"#,
            br#"{}"#,
            br#"[]"#,
            br#"{"inputs":[{"data":[1]}"#,
            br#"{"inputs":[{"data":[1]}]"#,
            br#"{"id":"unterminated}"#,
            br#"{"inputs":[{"data":[1]}] "x":1}"#,
        ] {
            assert!(
                split_request(body).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
