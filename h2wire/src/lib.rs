//! Conduit's HTTP/2 wire codec: frames (RFC 9113 §4, §6), HPACK (RFC 7541), header block
//! assembly and message field checks, with no IO, no clock, no async and no locks.
//!
//! # Design
//!
//! This crate is the first layer of the proxy's own HTTP/2 engine, which will replace the
//! `h2` crate under the proxy's shared exchange as the HTTP/1 engine replaced hyper's
//! HTTP/1: the engine owns sockets, buffers and stream state; this crate only says what bytes
//! mean and writes bytes. It is sans-IO in the way `quinn-proto` and `str0m` are: callers
//! hand it byte slices and get back borrowed views, decisions and errors, and give it values
//! to serialize into their own buffers (anything that implements [`bytes::BufMut`], such as
//! a `BytesMut` or a `Vec<u8>`).
//!
//! - [`frame`]: the connection preface, frame headers, a parser and a serializer per frame
//!   type. Parsing is in place: payloads are borrowed from the input.
//! - [`block`]: joins HEADERS (or `PUSH_PROMISE`) and CONTINUATION fragments into header
//!   blocks, and enforces that nothing comes between them.
//! - [`hpack`]: the HPACK [`hpack::Decoder`] (fields are lent to a caller's sink, not
//!   collected) and [`hpack::Encoder`], each with its dynamic table.
//! - [`message`]: checks on a request's, response's or trailers' fields (pseudo-headers,
//!   connection-specific fields, name and value syntax).
//! - [`Error`]: protocol errors with the scope the RFC gives them (the connection, or one
//!   stream) and their error code.
//!
//! What is *not* here, and belongs to the connection state machine built on top: stream
//! states and their transitions (§5.1), stream concurrency limits, flow-control windows
//! (§5.2, §6.9), the SETTINGS exchange and its acknowledgement, PING answers, GOAWAY
//! handling, and the checks that need that state (a DATA frame on an idle stream, a
//! `content-length` that disagrees with the DATA received, the first frame after the preface
//! being SETTINGS).
//!
//! # Drive loop
//!
//! A server connection reads bytes into a buffer and, after each read:
//!
//! 1. until the preface has been seen, [`frame::parse_preface`]; then
//! 2. [`frame::parse_frame`] with our `SETTINGS_MAX_FRAME_SIZE`, as long as it returns
//!    `Some((frame, len))` (consume `len` bytes after handling the frame; `None` means read
//!    more);
//! 3. each frame goes through [`block::BlockAssembler::handle_frame`]. Frames it passes
//!    through (DATA, SETTINGS, `WINDOW_UPDATE`, ...) go to the connection's state machine; a
//!    complete [`block::HeaderBlock`] goes to [`hpack::Decoder::decode`] *always*, even for a
//!    stream that will be refused, since HPACK state is shared by the connection. The sink
//!    runs a [`message::FieldChecker`] and keeps the fields the request needs;
//! 4. any [`Error`] says what to send: `GOAWAY` with its code for a connection error (and
//!    close), `RST_STREAM` for a stream error.
//!
//! Writing goes the other way: [`hpack::Encoder::encode`] (or [`hpack::Encoder::block`] to
//! encode fields as they are decoded) into a scratch buffer, then
//! [`frame::write_header_block`] splits the block into frames of the peer's
//! `SETTINGS_MAX_FRAME_SIZE`; the other `frame::write_*` functions and [`frame::Frame::write`]
//! write the rest.
//!
//! ```
//! use conduit_h2::block::{Assembled, BlockAssembler};
//! use conduit_h2::frame::{self, Frame, StreamId};
//! use conduit_h2::hpack::{Decoder, DecoderLimits, Encoder, Field};
//! use conduit_h2::message::{FieldChecker, MessageKind};
//!
//! // What a client sends: the preface, SETTINGS, then a request's HEADERS.
//! let mut wire = frame::PREFACE.to_vec();
//! frame::write_settings(&mut wire, &[frame::Setting::EnablePush(false)]);
//! let mut block = Vec::new();
//! Encoder::new(4096).encode(
//!     [
//!         Field::new(b":method", b"GET"),
//!         Field::new(b":scheme", b"http"),
//!         Field::new(b":authority", b"web.default:8080"),
//!         Field::new(b":path", b"/items"),
//!     ],
//!     &mut block,
//! );
//! frame::write_header_block(&mut wire, StreamId::new(1), &block, true, 16_384);
//!
//! // What the server does with it.
//! let mut input = &wire[..];
//! let preface = frame::parse_preface(input).unwrap().unwrap();
//! input = &input[preface..];
//! let mut assembler = BlockAssembler::default();
//! let mut decoder = Decoder::new(DecoderLimits::default());
//! let mut path = Vec::new();
//! while let Some((frame, len)) = frame::parse_frame(input, frame::DEFAULT_MAX_FRAME_SIZE).unwrap() {
//!     match assembler.handle_frame(frame).unwrap() {
//!         Assembled::Frame(Frame::Settings(settings)) => {
//!             assert_eq!(settings.iter().count(), 1);
//!         }
//!         Assembled::Block(block) => {
//!             let mut checker = FieldChecker::new(MessageKind::Request);
//!             let mut malformed = None;
//!             decoder
//!                 .decode(block.block, |field: Field<'_>| {
//!                     if malformed.is_some() {
//!                         return;
//!                     }
//!                     match checker.check(field.name, field.value) {
//!                         Err(error) => malformed = Some(error),
//!                         Ok(_) if field.name == b":path" => path = field.value.to_vec(),
//!                         Ok(_) => {}
//!                     }
//!                 })
//!                 .unwrap();
//!             assert_eq!(malformed, None);
//!             checker.finish().unwrap();
//!         }
//!         other => panic!("unexpected {other:?}"),
//!     }
//!     input = &input[len..];
//! }
//! assert!(input.is_empty());
//! assert_eq!(path, b"/items");
//! ```
//!
//! # What allocates
//!
//! Parsing frames allocates nothing. Assembling a header block copies it only when it spans
//! several frames, into a buffer the assembler reuses. Decoding lends fields from the input,
//! the static table or the decoder's reused scratch buffers; inserting into a dynamic table
//! copies into its ring buffer, which grows to at most twice the table size. Details in
//! [`hpack`].
//!
//! # Limits and their defaults
//!
//! | limit | default | where |
//! |---|---|---|
//! | frame payload (our `SETTINGS_MAX_FRAME_SIZE`) | 16 KiB ([`frame::DEFAULT_MAX_FRAME_SIZE`]) | [`frame::parse_frame`] |
//! | header block, all fragments | 128 KiB ([`block::DEFAULT_MAX_BLOCK_SIZE`]) | [`block::BlockAssembler`] |
//! | CONTINUATION frames per block | 64 ([`block::MAX_CONTINUATIONS`]) | [`block::BlockAssembler`] |
//! | header list (our `SETTINGS_MAX_HEADER_LIST_SIZE`) | 64 KiB ([`hpack::DEFAULT_MAX_HEADER_LIST_SIZE`]) | [`hpack::DecoderLimits`] |
//! | one string literal | 64 KiB ([`hpack::DEFAULT_MAX_STRING_LEN`]) | [`hpack::DecoderLimits`] |
//! | decoder's table (our `SETTINGS_HEADER_TABLE_SIZE`) | 4 KiB ([`hpack::DEFAULT_TABLE_SIZE`]) | [`hpack::DecoderLimits`] |
//! | encoder's table | the smaller of the peer's setting and ours | [`hpack::Encoder::new`] |
//! | HPACK integers | `u32::MAX`, 6 bytes | [`hpack::Decoder`] |
//!
//! Input a peer controls never makes this crate panic: every malformed input is an
//! [`Error`] or [`hpack::DecodeError`] (the tests and fuzz targets feed it arbitrary bytes).

// Attacker-controlled input must never panic (STYLE.md §4): no indexing outside tests, and no
// `expect` either.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::expect_used, clippy::panic)
)]
#![deny(missing_docs)]

pub mod block;
pub mod conn;
pub mod error;
pub mod frame;
pub mod hpack;
mod id;
pub mod message;

pub use error::{Error, ErrorCode};
