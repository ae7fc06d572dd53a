//! HPACK's primitive types: prefixed integers (RFC 7541 §5.1) and string literals (§5.2).

use bytes::BufMut;

use super::DecodeError;
use super::huffman;

/// The most continuation bytes an integer may have. Five carry 35 bits, more than any
/// value this decoder accepts ([`MAX_INTEGER`]); longer encodings (zero-padded ones
/// included) are refused rather than read byte by byte forever.
const MAX_CONTINUATION_BYTES: u32 = 5;

/// The largest integer accepted: every length and index HPACK carries fits (lengths are
/// bounded far below by the string limit anyway).
const MAX_INTEGER: u64 = u32::MAX as u64;

/// A reading position in a header block.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(block: &'a [u8]) -> Self {
        Self { rest: block }
    }

    /// The next byte, if any.
    #[inline]
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }

    /// The next `len` bytes.
    #[inline]
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let (taken, rest) = self
            .rest
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(taken)
    }

    /// An integer whose first byte, `first`, carries its `prefix_bits` low bits (§5.1).
    ///
    /// # Errors
    ///
    /// [`DecodeError::Truncated`], [`DecodeError::IntegerOverflow`].
    #[inline]
    pub(crate) fn integer(&mut self, first: u8, prefix_bits: u32) -> Result<usize, DecodeError> {
        let max_prefix = prefix_mask(prefix_bits);
        let prefix = first & max_prefix;
        if prefix < max_prefix {
            return Ok(usize::from(prefix));
        }
        let mut value = u64::from(prefix);
        let mut shift = 0;
        for _ in 0..MAX_CONTINUATION_BYTES {
            let byte = self.byte().ok_or(DecodeError::Truncated)?;
            value += u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if value > MAX_INTEGER {
                    return Err(DecodeError::IntegerOverflow);
                }
                return usize::try_from(value).map_err(|_| DecodeError::IntegerOverflow);
            }
            shift += 7;
        }
        Err(DecodeError::IntegerOverflow)
    }

    /// A string literal (§5.2): the input's bytes, or its Huffman decoding written into
    /// `scratch` (cleared first). Either way at most `max_len` bytes.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Truncated`], [`DecodeError::IntegerOverflow`],
    /// [`DecodeError::StringTooLong`], [`DecodeError::InvalidHuffman`].
    #[inline]
    pub(crate) fn string<'s>(
        &mut self,
        scratch: &'s mut Vec<u8>,
        max_len: usize,
    ) -> Result<&'s [u8], DecodeError>
    where
        'a: 's,
    {
        let first = self.byte().ok_or(DecodeError::Truncated)?;
        let len = self.integer(first, 7)?;
        if len > max_len {
            return Err(DecodeError::StringTooLong { limit: max_len });
        }
        let raw = self.take(len)?;
        if first & 0x80 == 0 {
            return Ok(raw);
        }
        scratch.clear();
        huffman::decode(raw, scratch).map_err(|_| DecodeError::InvalidHuffman)?;
        if scratch.len() > max_len {
            return Err(DecodeError::StringTooLong { limit: max_len });
        }
        Ok(scratch.as_slice())
    }
}

/// Writes `value` with an `prefix_bits`-bit prefix, the first byte's high bits set to
/// `flags` (§5.1).
#[inline]
pub(crate) fn encode_integer(value: usize, prefix_bits: u32, flags: u8, dst: &mut impl BufMut) {
    let max_prefix = prefix_mask(prefix_bits);
    match u8::try_from(value) {
        Ok(small) if small < max_prefix => dst.put_u8(flags | small),
        _ => {
            dst.put_u8(flags | max_prefix);
            let mut rest = value - usize::from(max_prefix);
            while rest >= 0x80 {
                dst.put_u8(low_seven(rest) | 0x80);
                rest >>= 7;
            }
            dst.put_u8(low_seven(rest));
        }
    }
}

/// The bits of a first byte an integer with a `prefix_bits`-bit prefix (1 to 8) uses.
#[inline]
fn prefix_mask(prefix_bits: u32) -> u8 {
    u8::try_from((1u16 << prefix_bits.min(8)) - 1).unwrap_or(u8::MAX)
}

/// The low 7 bits of `x`.
#[inline]
fn low_seven(x: usize) -> u8 {
    x.to_le_bytes().first().map_or(0, |b| b & 0x7f)
}

/// Writes a string literal, Huffman-coded when that is shorter (§5.2).
#[inline]
pub(crate) fn encode_raw(value: &[u8], dst: &mut impl BufMut) {
    encode_integer(value.len(), 7, 0, dst);
    dst.put_slice(value);
}

/// Writes a string literal, Huffman-coded when that is shorter (§5.2).
pub(crate) fn encode_string(value: &[u8], dst: &mut impl BufMut) {
    let huffman_len = huffman::encoded_len(value);
    if huffman_len < value.len() {
        encode_integer(huffman_len, 7, 0x80, dst);
        huffman::encode(value, dst);
    } else {
        encode_integer(value.len(), 7, 0, dst);
        dst.put_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn int(bytes: &[u8], prefix_bits: u32) -> Result<usize, DecodeError> {
        let mut cursor = Cursor::new(&bytes[1..]);
        let value = cursor.integer(bytes[0], prefix_bits)?;
        assert!(cursor.rest.is_empty(), "trailing bytes");
        Ok(value)
    }

    fn encoded(value: usize, prefix_bits: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(value, prefix_bits, 0, &mut out);
        out
    }

    #[test]
    fn rfc_integer_examples() {
        // RFC 7541 C.1.1: 10 with a 5-bit prefix.
        assert_eq!(encoded(10, 5), [0b01010]);
        assert_eq!(int(&[0b01010], 5), Ok(10));
        // C.1.2: 1337 with a 5-bit prefix.
        assert_eq!(encoded(1337, 5), [0b11111, 0b1001_1010, 0b0000_1010]);
        assert_eq!(int(&[0b11111, 0b1001_1010, 0b0000_1010], 5), Ok(1337));
        // C.1.3: 42 starting at an octet boundary.
        assert_eq!(encoded(42, 8), [42]);
        assert_eq!(int(&[42], 8), Ok(42));
        // The prefix's maximum needs a zero continuation byte.
        assert_eq!(encoded(31, 5), [31, 0]);
        assert_eq!(encoded(255, 8), [255, 0]);
        assert_eq!(int(&[255, 0], 8), Ok(255));
    }

    #[test]
    fn integer_limits() {
        assert_eq!(int(&[0x1f], 5), Err(DecodeError::Truncated));
        assert_eq!(int(&[0x1f, 0x80], 5), Err(DecodeError::Truncated));
        // u32::MAX is the largest value; one more overflows.
        let max = encoded(u32::MAX as usize, 5);
        assert_eq!(int(&max, 5), Ok(u32::MAX as usize));
        assert_eq!(
            int(&encoded(u32::MAX as usize + 1, 5), 5),
            Err(DecodeError::IntegerOverflow)
        );
        // Zero padding beyond five continuation bytes.
        assert_eq!(
            int(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], 5),
            Err(DecodeError::IntegerOverflow)
        );
        assert_eq!(
            int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x7f], 5),
            Err(DecodeError::IntegerOverflow)
        );
    }

    #[test]
    fn strings() {
        let mut scratch = Vec::new();
        let mut cursor = Cursor::new(b"\x03abc\x83\x64\x0e\xff");
        assert_eq!(cursor.string(&mut scratch, 16).unwrap(), b"abc");
        assert_eq!(cursor.string(&mut scratch, 16).unwrap(), b"307");
        let mut cursor = Cursor::new(b"\x04abc");
        assert_eq!(cursor.string(&mut scratch, 16), Err(DecodeError::Truncated));
        let mut cursor = Cursor::new(b"\x03abc");
        assert_eq!(
            cursor.string(&mut scratch, 2),
            Err(DecodeError::StringTooLong { limit: 2 })
        );
        // Huffman: 3 bytes that decode to 4 characters, over a limit of 3.
        let mut coded = Vec::new();
        encode_string(b"0000", &mut coded);
        assert_eq!(coded[0], 0x80 | 3);
        let mut cursor = Cursor::new(&coded);
        assert_eq!(
            cursor.string(&mut scratch, 3),
            Err(DecodeError::StringTooLong { limit: 3 })
        );
    }

    proptest! {
        #[test]
        fn integers_round_trip(value in 0usize..=u32::MAX as usize, prefix_bits in 1u32..=8, flags in any::<u8>()) {
            let flags = flags & !prefix_mask(prefix_bits);
            let mut out = Vec::new();
            encode_integer(value, prefix_bits, flags, &mut out);
            prop_assert_eq!(out[0] & flags, flags);
            prop_assert_eq!(int(&out, prefix_bits), Ok(value));
        }

        #[test]
        fn strings_round_trip(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            encode_string(&value, &mut out);
            let mut scratch = Vec::new();
            let mut cursor = Cursor::new(&out);
            prop_assert_eq!(cursor.string(&mut scratch, 300).unwrap(), &value[..]);
            prop_assert!(cursor.rest.is_empty());
        }
    }
}
