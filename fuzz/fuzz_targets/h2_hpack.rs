//! The HPACK decoder (`conduit_h2::hpack`), on the header blocks a peer sends one after the
//! other on a connection.
//!
//! The first byte picks the decoder's table size setting (times 32); then each block is a
//! length byte and that many bytes. Never panics, the table never exceeds its size, and every
//! list the decoder accepts, re-encoded by our encoder (as the proxy forwards it), decodes
//! to the same fields, the never-indexed ones still never indexed, with the encoder's and that
//! decoder's tables equal after every block.
#![no_main]

use conduit_h2::hpack::{DecodeError, Decoder, DecoderLimits, Encoder, Field};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches them.
const LIMITS: DecoderLimits = DecoderLimits {
    max_table_size: 0,
    max_header_list_size: 2048,
    max_string_len: 512,
};

type Fields = Vec<(Vec<u8>, Vec<u8>, bool)>;

fn decode(decoder: &mut Decoder, block: &[u8]) -> (Fields, Result<(), DecodeError>) {
    let mut fields = Vec::new();
    let result = decoder.decode(block, |f: Field<'_>| {
        fields.push((f.name.to_vec(), f.value.to_vec(), f.sensitive));
    });
    (fields, result)
}

fuzz_target!(|input: &[u8]| {
    let Some((&setting, mut rest)) = input.split_first() else {
        return;
    };
    let max_table_size = usize::from(setting) * 32;
    let mut decoder = Decoder::new(DecoderLimits {
        max_table_size,
        ..LIMITS
    });
    // The proxy's other side: what it forwards, and the next hop's decoder.
    let mut encoder = Encoder::new(4096);
    let mut next_hop = Decoder::new(DecoderLimits {
        max_header_list_size: usize::MAX,
        ..DecoderLimits::default()
    });

    while let Some((&len, after)) = rest.split_first() {
        let (block, after) = after.split_at(usize::from(len).min(after.len()));
        rest = after;
        let (fields, result) = decode(&mut decoder, block);
        assert!(decoder.table().size() <= decoder.table().max_size());
        assert!(decoder.table().max_size() <= max_table_size);
        match result {
            Ok(()) => {}
            // A stream error: the table is in step, the connection goes on.
            Err(DecodeError::HeaderListTooLarge { .. }) => continue,
            // A connection error: nothing more is read.
            Err(_) => return,
        }
        let list_size: usize = fields.iter().map(|(n, v, _)| n.len() + v.len() + 32).sum();
        assert!(list_size <= LIMITS.max_header_list_size);

        let mut forwarded = Vec::new();
        encoder.encode(
            fields.iter().map(|(name, value, sensitive)| Field {
                name,
                value,
                sensitive: *sensitive,
            }),
            &mut forwarded,
        );
        let (again, result) = decode(&mut next_hop, &forwarded);
        assert_eq!(result, Ok(()), "the forwarded block does not decode");
        assert_eq!(again.len(), fields.len());
        for ((name, value, sensitive), (n, v, s)) in again.iter().zip(&fields) {
            assert_eq!((name, value), (n, v));
            assert!(*sensitive || !*s, "a never-indexed field lost its flag");
        }
        assert_eq!(next_hop.table(), encoder.table());
    }
});
