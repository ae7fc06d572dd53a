//! The HTTP/2 frame parser and header block assembly (`conduit_h2::frame`, `block`), with the
//! HPACK decoder behind them, on the bytes a client sends after connecting.
//!
//! The first byte picks `SETTINGS_MAX_FRAME_SIZE` (small ones, so the limit is reached, or the
//! default); then the input runs through the preface check and the frame parser as a
//! connection would read it, until an error or the end. Never panics, and:
//! - every prefix of a frame that parses asks for more (frames split across reads are fine);
//! - a parsed frame, written out again, parses to the same frame (the serializers and parsers
//!   agree), and is no longer than the limit;
//! - header blocks are only yielded whole, joined in order, within the block bound.
#![no_main]

use conduit_h2::block::{Assembled, BlockAssembler};
use conduit_h2::frame::{self, Frame};
use conduit_h2::hpack::{Decoder, DecoderLimits, Field};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const MAX_BLOCK_SIZE: usize = 1024;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, mut rest)) = input.split_first() else {
        return;
    };
    let max_frame_size = if pick < 128 {
        u32::from(pick)
    } else {
        frame::DEFAULT_MAX_FRAME_SIZE
    };
    match frame::parse_preface(rest) {
        Ok(Some(len)) => rest = &rest[len..],
        Ok(None) | Err(_) => {}
    }
    let mut assembler = BlockAssembler::new(MAX_BLOCK_SIZE);
    let mut decoder = Decoder::new(DecoderLimits::default());
    let mut fragments: Vec<u8> = Vec::new();

    loop {
        let (frame, len) = match frame::parse_frame(rest, max_frame_size) {
            Ok(Some(parsed)) => parsed,
            Ok(None) | Err(_) => return,
        };
        assert!(len <= rest.len() && len >= frame::HEADER_LEN);
        assert!(len - frame::HEADER_LEN <= max_frame_size as usize);
        for cut in [0, len / 2, len - 1] {
            assert_eq!(
                frame::parse_frame(&rest[..cut], max_frame_size),
                Ok(None),
                "a prefix of {cut} bytes of a frame"
            );
        }
        let mut written = Vec::new();
        frame.write(&mut written);
        assert_eq!(
            written.len(),
            len,
            "{frame:?} written back with another length"
        );
        assert_eq!(
            frame::parse_frame(&written, max_frame_size),
            Ok(Some((frame, len)))
        );

        // What the assembler must join, kept here the simple way.
        match frame {
            Frame::Headers(f) => fragments = f.fragment.to_vec(),
            Frame::PushPromise(f) => fragments = f.fragment.to_vec(),
            Frame::Continuation(f) => fragments.extend_from_slice(f.fragment),
            _ => {}
        }
        match assembler.handle_frame(frame) {
            Ok(Assembled::Block(block)) => {
                assert_eq!(block.block, &fragments[..]);
                assert!(block.block.len() <= MAX_BLOCK_SIZE);
                let _ = block.check_dependency();
                if decoder.decode(block.block, |_: Field<'_>| {}).is_err() {
                    return;
                }
            }
            Ok(Assembled::Frame(_)) => assert!(!assembler.is_open()),
            Ok(Assembled::Incomplete) => assert!(assembler.is_open()),
            Err(error) => {
                assert!(error.is_connection_error());
                return;
            }
        }
        rest = &rest[len..];
    }
});
