//! Header block assembly: a HEADERS or `PUSH_PROMISE` frame and the CONTINUATION frames that
//! follow it make one header block (RFC 9113 §4.3, §6.10).
//!
//! Every frame of a connection goes through [`BlockAssembler::handle_frame`], which passes
//! the frames that are not part of a block through, and yields a [`HeaderBlock`] when one is
//! complete. A block carried by one frame (the common case) is lent straight from the input;
//! only a block split over several frames is copied, into a buffer the assembler reuses.
//!
//! While a block is open, any frame other than a CONTINUATION on the same stream is a
//! connection `PROTOCOL_ERROR` (unknown frame types included, §5.5), and so is a
//! CONTINUATION when none is expected. A block larger than the configured bound, or split
//! into more than [`MAX_CONTINUATIONS`] frames, ends the connection with `ENHANCE_YOUR_CALM`:
//! it cannot be refused alone, since the HPACK state would need the whole block (the 2024
//! "CONTINUATION flood" attacks sent endless blocks).

use crate::error::{Error, ErrorCode};
use crate::frame::{Continuation, Frame, Headers, PushPromise, StreamDependency, StreamId};

/// The largest header block accepted by default, all fragments together: twice the default
/// header list size (`hpack::DEFAULT_MAX_HEADER_LIST_SIZE`), so a list a little over that
/// limit is still decoded and refused for its stream alone (a 431), not the connection.
pub const DEFAULT_MAX_BLOCK_SIZE: usize = 2 * crate::hpack::DEFAULT_MAX_HEADER_LIST_SIZE;

/// The most CONTINUATION frames one block may use. Peers send one or two; this bound stops a
/// stream of empty CONTINUATIONs, which would never reach the size bound.
pub const MAX_CONTINUATIONS: u32 = 64;

/// What a header block opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// A HEADERS frame: a request, a response (or an informational one), or trailers.
    Headers {
        /// `END_STREAM` on the HEADERS frame.
        end_stream: bool,
        /// The stream dependency, if any (see [`Headers::check_dependency`]).
        dependency: Option<StreamDependency>,
    },
    /// A `PUSH_PROMISE` frame.
    PushPromise {
        /// The stream promised.
        promised_id: StreamId,
    },
}

/// A complete header block, to give to [`crate::hpack::Decoder::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderBlock<'a> {
    /// The stream it is on.
    pub stream_id: StreamId,
    /// What opened it.
    pub kind: BlockKind,
    /// The block: all fragments, joined.
    pub block: &'a [u8],
}

impl HeaderBlock<'_> {
    /// The stream error of a HEADERS frame whose stream depends on itself (RFC 9113 §5.3.1),
    /// to report once the block is decoded.
    ///
    /// # Errors
    ///
    /// A stream `PROTOCOL_ERROR`.
    pub fn check_dependency(&self) -> Result<(), Error> {
        match self.kind {
            BlockKind::Headers {
                dependency: Some(d),
                ..
            } if d.dependency == self.stream_id => Err(Error::stream(
                self.stream_id,
                ErrorCode::PROTOCOL_ERROR,
                "stream depends on itself",
            )),
            _ => Ok(()),
        }
    }
}

/// What [`BlockAssembler::handle_frame`] made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assembled<'a> {
    /// A frame that is not part of a header block, passed through.
    Frame(Frame<'a>),
    /// A complete header block.
    Block(HeaderBlock<'a>),
    /// A fragment was kept; CONTINUATION frames must follow.
    Incomplete,
}

/// The block being assembled.
#[derive(Clone, Copy, Debug)]
struct Open {
    stream_id: StreamId,
    kind: BlockKind,
    continuations: u32,
}

/// Joins header block fragments (see the module documentation).
#[derive(Clone, Debug)]
pub struct BlockAssembler {
    open: Option<Open>,
    buffer: Vec<u8>,
    max_block_size: usize,
}

impl BlockAssembler {
    /// An assembler that refuses blocks larger than `max_block_size` bytes
    /// ([`DEFAULT_MAX_BLOCK_SIZE`] by default).
    #[must_use]
    pub fn new(max_block_size: usize) -> Self {
        Self {
            open: None,
            buffer: Vec::new(),
            max_block_size,
        }
    }

    /// Whether a block is open: the next frame must be its CONTINUATION.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Takes the next frame of the connection.
    ///
    /// # Errors
    ///
    /// A connection error: `PROTOCOL_ERROR` for a frame out of place, `ENHANCE_YOUR_CALM` for
    /// a block over the bounds.
    pub fn handle_frame<'a>(&'a mut self, frame: Frame<'a>) -> Result<Assembled<'a>, Error> {
        if let Some(open) = self.open {
            let Frame::Continuation(continuation) = frame else {
                return Err(Error::connection(
                    ErrorCode::PROTOCOL_ERROR,
                    "frame other than CONTINUATION inside a header block",
                ));
            };
            return self.continuation(open, continuation);
        }
        match frame {
            Frame::Headers(Headers {
                stream_id,
                end_stream,
                end_headers,
                dependency,
                fragment,
                ..
            }) => {
                let kind = BlockKind::Headers {
                    end_stream,
                    dependency,
                };
                self.start(stream_id, kind, end_headers, fragment)
            }
            Frame::PushPromise(PushPromise {
                stream_id,
                end_headers,
                promised_id,
                fragment,
                ..
            }) => {
                let kind = BlockKind::PushPromise { promised_id };
                self.start(stream_id, kind, end_headers, fragment)
            }
            Frame::Continuation(_) => Err(Error::connection(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION frame outside a header block",
            )),
            other => Ok(Assembled::Frame(other)),
        }
    }

    fn too_large(&self, len: usize) -> Result<(), Error> {
        if len > self.max_block_size {
            return Err(Error::connection(
                ErrorCode::ENHANCE_YOUR_CALM,
                "header block larger than the limit",
            ));
        }
        Ok(())
    }

    fn start<'a>(
        &'a mut self,
        stream_id: StreamId,
        kind: BlockKind,
        end_headers: bool,
        fragment: &'a [u8],
    ) -> Result<Assembled<'a>, Error> {
        self.too_large(fragment.len())?;
        if end_headers {
            return Ok(Assembled::Block(HeaderBlock {
                stream_id,
                kind,
                block: fragment,
            }));
        }
        self.buffer.clear();
        self.buffer.extend_from_slice(fragment);
        self.open = Some(Open {
            stream_id,
            kind,
            continuations: 0,
        });
        Ok(Assembled::Incomplete)
    }

    fn continuation<'a>(
        &'a mut self,
        mut open: Open,
        continuation: Continuation<'_>,
    ) -> Result<Assembled<'a>, Error> {
        if continuation.stream_id != open.stream_id {
            return Err(Error::connection(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION frame on another stream than its header block",
            ));
        }
        open.continuations += 1;
        if open.continuations > MAX_CONTINUATIONS {
            return Err(Error::connection(
                ErrorCode::ENHANCE_YOUR_CALM,
                "header block split into too many CONTINUATION frames",
            ));
        }
        self.too_large(
            self.buffer
                .len()
                .saturating_add(continuation.fragment.len()),
        )?;
        self.buffer.extend_from_slice(continuation.fragment);
        if !continuation.end_headers {
            self.open = Some(open);
            return Ok(Assembled::Incomplete);
        }
        self.open = None;
        Ok(Assembled::Block(HeaderBlock {
            stream_id: open.stream_id,
            kind: open.kind,
            block: &self.buffer,
        }))
    }
}

impl Default for BlockAssembler {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BLOCK_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Data;

    fn headers(stream: u32, end_headers: bool, fragment: &[u8]) -> Frame<'_> {
        Frame::Headers(Headers {
            stream_id: StreamId::new(stream),
            end_stream: true,
            end_headers,
            pad_len: None,
            dependency: None,
            fragment,
        })
    }

    fn continuation(stream: u32, end_headers: bool, fragment: &[u8]) -> Frame<'_> {
        Frame::Continuation(Continuation {
            stream_id: StreamId::new(stream),
            end_headers,
            fragment,
        })
    }

    fn code(result: Result<Assembled<'_>, Error>) -> ErrorCode {
        match result {
            Err(error) => {
                assert!(error.is_connection_error());
                error.code()
            }
            Ok(other) => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn a_single_frame_block_is_lent_from_the_input() {
        let mut assembler = BlockAssembler::default();
        let input = b"abc";
        let Ok(Assembled::Block(block)) = assembler.handle_frame(headers(1, true, input)) else {
            panic!("no block");
        };
        assert_eq!(block.block.as_ptr(), input.as_ptr());
        assert_eq!(
            block.kind,
            BlockKind::Headers {
                end_stream: true,
                dependency: None
            }
        );
        assert!(!assembler.is_open());
    }

    #[test]
    fn fragments_are_joined() {
        let mut assembler = BlockAssembler::default();
        assert_eq!(
            assembler.handle_frame(headers(3, false, b"ab")),
            Ok(Assembled::Incomplete)
        );
        assert!(assembler.is_open());
        assert_eq!(
            assembler.handle_frame(continuation(3, false, b"")),
            Ok(Assembled::Incomplete)
        );
        let Ok(Assembled::Block(block)) = assembler.handle_frame(continuation(3, true, b"cd"))
        else {
            panic!("no block");
        };
        assert_eq!(block.block, b"abcd");
        assert_eq!(block.stream_id, StreamId::new(3));
        // Other frames pass through again.
        let data = Frame::Data(Data {
            stream_id: StreamId::new(3),
            end_stream: false,
            pad_len: None,
            data: b"x",
        });
        assert_eq!(assembler.handle_frame(data), Ok(Assembled::Frame(data)));
    }

    #[test]
    fn frames_out_of_place_end_the_connection() {
        let mut assembler = BlockAssembler::default();
        assert_eq!(
            code(assembler.handle_frame(continuation(1, true, b""))),
            ErrorCode::PROTOCOL_ERROR
        );
        let _ = assembler.handle_frame(headers(1, false, b"a"));
        assert_eq!(
            code(assembler.handle_frame(continuation(3, true, b""))),
            ErrorCode::PROTOCOL_ERROR
        );

        let mut assembler = BlockAssembler::default();
        let _ = assembler.handle_frame(headers(1, false, b"a"));
        assert_eq!(
            code(assembler.handle_frame(headers(1, true, b"b"))),
            ErrorCode::PROTOCOL_ERROR
        );

        let mut assembler = BlockAssembler::default();
        let _ = assembler.handle_frame(headers(1, false, b"a"));
        let unknown = Frame::Unknown(crate::frame::Unknown {
            kind: 0xfa,
            flags: 0,
            stream_id: StreamId::ZERO,
            payload: b"",
        });
        assert_eq!(
            code(assembler.handle_frame(unknown)),
            ErrorCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn blocks_are_bounded() {
        let mut assembler = BlockAssembler::new(4);
        assert_eq!(
            code(assembler.handle_frame(headers(1, true, b"abcde"))),
            ErrorCode::ENHANCE_YOUR_CALM
        );
        let mut assembler = BlockAssembler::new(4);
        let _ = assembler.handle_frame(headers(1, false, b"abc"));
        assert_eq!(
            code(assembler.handle_frame(continuation(1, true, b"de"))),
            ErrorCode::ENHANCE_YOUR_CALM
        );
        let mut assembler = BlockAssembler::new(4);
        let _ = assembler.handle_frame(headers(1, false, b""));
        for _ in 0..MAX_CONTINUATIONS {
            assert_eq!(
                assembler.handle_frame(continuation(1, false, b"")),
                Ok(Assembled::Incomplete)
            );
        }
        assert_eq!(
            code(assembler.handle_frame(continuation(1, false, b""))),
            ErrorCode::ENHANCE_YOUR_CALM
        );
    }

    #[test]
    fn self_dependency_is_a_stream_error_after_decoding() {
        let mut assembler = BlockAssembler::default();
        let frame = Frame::Headers(Headers {
            stream_id: StreamId::new(5),
            end_stream: false,
            end_headers: true,
            pad_len: None,
            dependency: Some(StreamDependency {
                dependency: StreamId::new(5),
                exclusive: false,
                weight: 15,
            }),
            fragment: b"",
        });
        let Ok(Assembled::Block(block)) = assembler.handle_frame(frame) else {
            panic!("no block");
        };
        let error = block.check_dependency().unwrap_err();
        assert!(!error.is_connection_error());
        assert_eq!(error.code(), ErrorCode::PROTOCOL_ERROR);
    }
}
