//! The Huffman code of HPACK string literals (RFC 7541 §5.2, Appendix B).
//!
//! The code in Appendix B is canonical: codes of one length are consecutive numbers in symbol
//! order, and each length's first code follows the previous length's last one. So the table
//! here is the code *length* of each of the 257 symbols, and the codes themselves are derived
//! at compile time ([`CODES`]); the tests check the derivation against codes printed in the
//! RFC.
//!
//! Decoding is a table-driven state machine over nibbles (4 bits at a time, two table lookups
//! per input byte), not a walk of the tree bit by bit: a state is an inner node of the code
//! tree (there are exactly 256 of them for 257 leaves), and each of its 16 transitions says
//! which node 4 more bits lead to and which symbol, if any, they complete. No code is shorter
//! than 5 bits, so 4 bits complete at most one symbol. The table ([`DECODE`], 12 KiB) is also
//! built at compile time from the code lengths.

use bytes::BufMut;

/// Bits of each symbol's code: bytes 0..=255, then EOS (256). RFC 7541 Appendix B.
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    // 0x00..0x1f: control characters.
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    // ' ' ! " # $ % & ' ( ) * + , - . /
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    // 0 1 2 3 4 5 6 7 8 9 : ; < = > ?
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    // @ A B C D E F G H I J K L M N O
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    // P Q R S T U V W X Y Z [ \ ] ^ _
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    // ` a b c d e f g h i j k l m n o
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    // p q r s t u v w x y z { | } ~ DEL
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    // 0x80..0xff.
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    // EOS.
    30,
];

/// The end-of-string symbol: never valid inside a string.
const EOS: usize = 256;

/// `(code, bits)` of each symbol, the code right-aligned.
pub(crate) const CODES: [(u32, u8); 257] = canonical_codes();

#[expect(
    clippy::indexing_slicing,
    reason = "compile-time evaluation: an index out of bounds fails the build, never a run"
)]
const fn canonical_codes() -> [(u32, u8); 257] {
    let mut codes = [(0u32, 0u8); 257];
    let mut next: u32 = 0;
    let mut bits: u8 = 1;
    while bits <= 30 {
        let mut symbol = 0;
        while symbol < 257 {
            if LENGTHS[symbol] == bits {
                codes[symbol] = (next, bits);
                next += 1;
            }
            symbol += 1;
        }
        next <<= 1;
        bits += 1;
    }
    // A complete prefix code: the last code of the longest length is all ones.
    assert!(codes[EOS].0 == 0x3fff_ffff);
    codes
}

/// One transition of the decoding state machine.
#[derive(Clone, Copy)]
struct Step {
    /// The inner node (state) reached.
    next: u8,
    /// [`EMIT`], [`FAIL`], [`ACCEPT`].
    flags: u8,
    /// The symbol completed, with [`EMIT`].
    symbol: u8,
}

/// The step completed `symbol`.
const EMIT: u8 = 1;
/// The bits spell EOS: the string is invalid.
const FAIL: u8 = 2;
/// The string may end after this step: the bits since the last symbol are a prefix of EOS
/// (all ones) of at most 7 bits (RFC 7541 §5.2).
const ACCEPT: u8 = 4;

/// A child of a tree node: an inner node's index, or a leaf (`LEAF | symbol`).
const LEAF: u16 = 0x8000;

/// `DECODE[state][nibble]`.
static DECODE: [[Step; 16]; 256] = decode_table();

#[expect(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "compile-time evaluation: a bad index or node count fails the build, never a run"
)]
const fn decode_table() -> [[Step; 16]; 256] {
    // The code tree: children of the 256 inner nodes; node 0 is the root, and 0 as a child
    // means "not yet built" (the root is nobody's child).
    let mut tree = [[0u16; 2]; 256];
    let mut nodes: usize = 1;
    let mut symbol = 0;
    while symbol < 257 {
        let (code, bits) = CODES[symbol];
        let mut node = 0;
        let mut bit = bits;
        while bit > 1 {
            bit -= 1;
            let side = ((code >> bit) & 1) as usize;
            if tree[node][side] == 0 {
                tree[node][side] = nodes as u16;
                nodes += 1;
            }
            node = tree[node][side] as usize;
        }
        tree[node][(code & 1) as usize] = LEAF | symbol as u16;
        symbol += 1;
    }
    assert!(nodes == 256);

    // Where a string may end: the root, and the all-ones path down to depth 7.
    let mut accepting = [false; 256];
    accepting[0] = true;
    let mut node = 0;
    let mut depth = 0;
    while depth < 7 {
        node = tree[node][1] as usize;
        accepting[node] = true;
        depth += 1;
    }

    let mut table = [[Step {
        next: 0,
        flags: 0,
        symbol: 0,
    }; 16]; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut flags = 0;
            let mut emitted = 0;
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = tree[node][(nibble >> bit) & 1];
                if child & LEAF == 0 {
                    node = child as usize;
                } else if (child & !LEAF) as usize == EOS {
                    flags = FAIL;
                    node = 0;
                    break;
                } else {
                    flags = EMIT;
                    emitted = (child & !LEAF) as u8;
                    node = 0;
                }
            }
            if flags != FAIL && accepting[node] {
                flags |= ACCEPT;
            }
            table[state][nibble] = Step {
                next: node as u8,
                flags,
                symbol: emitted,
            };
            nibble += 1;
        }
        state += 1;
    }
    table
}

/// The step from `state` on `nibble` (a failing one for indexes that cannot occur: a state
/// is a `u8` and a nibble below 16, so the fallback is never taken and compiles away).
#[inline]
fn step(state: u8, nibble: u8) -> Step {
    const FAILED: Step = Step {
        next: 0,
        flags: FAIL,
        symbol: 0,
    };
    DECODE
        .get(usize::from(state))
        .and_then(|row| row.get(usize::from(nibble)))
        .copied()
        .unwrap_or(FAILED)
}

/// A Huffman-coded string that does not decode: it contains EOS, or ends with padding that is
/// longer than 7 bits or not a prefix of EOS (RFC 7541 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InvalidHuffman;

/// Appends the decoding of `src` to `dst`.
///
/// # Errors
///
/// [`InvalidHuffman`]; `dst` then holds a prefix of the decoding.
pub(crate) fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), InvalidHuffman> {
    // At most one symbol per 5 bits.
    dst.reserve(src.len().saturating_mul(8) / 5);
    let mut state = 0u8;
    let mut accept = true;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = step(state, nibble);
            if step.flags & FAIL != 0 {
                return Err(InvalidHuffman);
            }
            if step.flags & EMIT != 0 {
                dst.push(step.symbol);
            }
            state = step.next;
            accept = step.flags & ACCEPT != 0;
        }
    }
    if accept { Ok(()) } else { Err(InvalidHuffman) }
}

/// The length of the code of `byte`, in bits.
#[inline]
fn code(byte: u8) -> (u64, u32) {
    CODES
        .get(usize::from(byte))
        .map_or((0, 0), |&(code, bits)| (u64::from(code), u32::from(bits)))
}

/// The length in bytes of the Huffman coding of `src`.
#[must_use]
pub(crate) fn encoded_len(src: &[u8]) -> usize {
    let bits: u64 = src.iter().map(|&b| u64::from(code(b).1)).sum();
    usize::try_from(bits.div_ceil(8)).unwrap_or(usize::MAX)
}

/// The low 8 bits of `x`.
#[inline]
fn low_byte(x: u64) -> u8 {
    x.to_le_bytes()[0]
}

/// Writes the Huffman coding of `src`, padded with the most significant bits of EOS (ones).
pub(crate) fn encode(src: &[u8], dst: &mut impl BufMut) {
    // Pending bits, right-aligned: fewer than 8 between bytes, so never more than 8 + 30.
    let mut acc: u64 = 0;
    let mut pending: u32 = 0;
    for &byte in src {
        let (code, bits) = code(byte);
        acc = (acc << bits) | code;
        pending += bits;
        while pending >= 8 {
            pending -= 8;
            dst.put_u8(low_byte(acc >> pending));
        }
    }
    if pending > 0 {
        let pad = 8 - pending;
        dst.put_u8(low_byte((acc << pad) | ((1 << pad) - 1)));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn encoded(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(src, &mut out);
        assert_eq!(out.len(), encoded_len(src));
        out
    }

    fn decoded(src: &[u8]) -> Result<Vec<u8>, InvalidHuffman> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn derived_codes_match_the_rfc() {
        // (symbol, code as hex, bits) from RFC 7541 Appendix B: the first and last symbol of
        // every length, and symbols whose neighbours in byte order have other lengths.
        let printed: &[(usize, u32, u8)] = &[
            (b'0' as usize, 0x0, 5),
            (b't' as usize, 0x9, 5),
            (b' ' as usize, 0x14, 6),
            (b'u' as usize, 0x2d, 6),
            (b':' as usize, 0x5c, 7),
            (b'z' as usize, 0x7b, 7),
            (b'&' as usize, 0xf8, 8),
            (b'X' as usize, 0xfc, 8),
            (b'Z' as usize, 0xfd, 8),
            (b'!' as usize, 0x3f8, 10),
            (b'?' as usize, 0x3fc, 10),
            (b'\'' as usize, 0x7fa, 11),
            (b'|' as usize, 0x7fc, 11),
            (b'#' as usize, 0xffa, 12),
            (b'>' as usize, 0xffb, 12),
            (0, 0x1ff8, 13),
            (b'~' as usize, 0x1ffd, 13),
            (b'^' as usize, 0x3ffc, 14),
            (b'}' as usize, 0x3ffd, 14),
            (b'<' as usize, 0x7ffc, 15),
            (b'{' as usize, 0x7ffe, 15),
            (b'\\' as usize, 0x7fff0, 19),
            (195, 0x7fff1, 19),
            (208, 0x7fff2, 19),
            (128, 0xfffe6, 20),
            (226, 0xfffed, 20),
            (153, 0x1fffdc, 21),
            (230, 0x1fffe8, 21),
            (129, 0x3fffd2, 22),
            (233, 0x3fffeb, 22),
            (1, 0x7fffd8, 23),
            (239, 0x7ffff4, 23),
            (9, 0xffffea, 24),
            (237, 0xfffff5, 24),
            (199, 0x1ffffec, 25),
            (235, 0x1ffffef, 25),
            (192, 0x3ffffe0, 26),
            (255, 0x3ffffee, 26),
            (203, 0x7ffffde, 27),
            (254, 0x7fffff0, 27),
            (2, 0xfffffe2, 28),
            (127, 0xffffffc, 28),
            (220, 0xffffffd, 28),
            (249, 0xffffffe, 28),
            (10, 0x3ffffffc, 30),
            (13, 0x3ffffffd, 30),
            (22, 0x3ffffffe, 30),
            (EOS, 0x3fffffff, 30),
        ];
        for &(symbol, code, bits) in printed {
            assert_eq!(CODES[symbol], (code, bits), "symbol {symbol}");
        }
        // Kraft's equality: the code is complete (every bit string is a prefix of a code).
        let kraft: u64 = LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
    }

    #[test]
    fn rfc_examples() {
        // RFC 7541 C.4.1 and C.6.1.
        assert_eq!(
            encoded(b"www.example.com"),
            [
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
            ]
        );
        assert_eq!(encoded(b"no-cache"), [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]);
        assert_eq!(encoded(b"302"), [0x64, 0x02]);
        assert_eq!(decoded(&[0x64, 0x0e, 0xff]).unwrap(), b"307");
        assert_eq!(decoded(&[]).unwrap(), b"");
    }

    #[test]
    fn padding_rules() {
        // '0' is 00000: three bits of padding, which must be ones.
        assert_eq!(decoded(&[0b0000_0111]).unwrap(), b"0");
        assert_eq!(decoded(&[0b0000_0011]), Err(InvalidHuffman));
        assert_eq!(decoded(&[0b0000_0101]), Err(InvalidHuffman));
        // A whole byte of padding is more than 7 bits.
        assert_eq!(decoded(&[0b0000_0111, 0xff]), Err(InvalidHuffman));
        assert_eq!(decoded(&[0xff]), Err(InvalidHuffman));
        // Six and seven bits of padding are fine: "00" is 10 bits, "00000" 25.
        assert_eq!(decoded(&[0b0000_0000, 0b0011_1111]).unwrap(), b"00");
        assert_eq!(decoded(&[0, 0, 0, 0x7f]).unwrap(), b"00000");
        // EOS inside a string.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(InvalidHuffman));
        // A truncated long code (24 bits of '\t' cut to 16) is an unfinished symbol, not
        // padding.
        assert_eq!(decoded(&[0xff, 0xff]), Err(InvalidHuffman));
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encoded(&all)).unwrap(), all);
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(decoded(&encoded(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decoded(&bytes);
        }
    }
}
