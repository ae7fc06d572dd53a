//! HPACK, the header compression of HTTP/2 (RFC 7541).
//!
//! A [`Decoder`] turns header blocks into fields, an [`Encoder`] fields into header blocks;
//! each owns one [`DynamicTable`], and the peer's decoder (encoder) keeps a copy of it in
//! step. A connection has one of each: HPACK state is per direction and per connection, so
//! every block must be decoded (even for a stream about to be reset) and in the order the
//! blocks arrived.
//!
//! # Table size settings
//!
//! Two settings bound the tables, one per direction:
//! - ours, `SETTINGS_HEADER_TABLE_SIZE` as *we* send it, bounds the [`Decoder`]'s table: call
//!   [`Decoder::set_max_table_size`] when the peer acknowledges the SETTINGS frame that
//!   carried it. If it went below the table's current size, the peer's next block must begin
//!   with a dynamic table size update that fits, or decoding fails (RFC 7541 §4.2).
//! - the peer's bounds the [`Encoder`]'s table: call [`Encoder::set_max_table_size`] when its
//!   SETTINGS frame arrives. The encoder uses the smaller of that and its own preference, and
//!   signals each change at the start of the next block (the smallest size in between first,
//!   then the final one, §4.2).
//!
//! # What allocates
//!
//! - Decoding: fields are lent to the caller's [`Sink`] as slices borrowed from the block
//!   (plain string literals), from the static table, or from the decoder's two scratch
//!   buffers (Huffman-coded literals, and a name copied out of the dynamic table for a field
//!   that is about to be inserted), which are reused from block to block: nothing is
//!   allocated per field once they have grown to the longest string seen. Inserting into the
//!   dynamic table copies the field into the table's ring buffer, which grows by doubling up to
//!   twice the table size and then stays put.
//! - Encoding writes into the caller's buffer ([`bytes::BufMut`]) and inserts into its table
//!   the same way; it allocates nothing else.
//!
//! # Limits
//!
//! [`DecoderLimits`] bound what a peer can make the decoder do: the header list size as
//! `SETTINGS_MAX_HEADER_LIST_SIZE` accounts it (names, values and 32 per field), the length
//! of one string literal (which bounds the scratch buffers), and the table size. Integers
//! above `u32::MAX`, or longer than 6 bytes, are refused. Every malformed input is an error,
//! never a panic.
//!
//! # Encoding policy
//!
//! For each field, in order of preference:
//! 1. a field that is *sensitive* ([`Field::sensitive`], or one of the names below) is sent
//!    as a literal never indexed (§6.2.3), so no intermediary ever puts it in a table where a
//!    compression side channel could probe it (§7.1): `authorization`,
//!    `proxy-authorization`, and `cookie` values shorter than 20 bytes (short enough to guess,
//!    the rule nghttp2 uses; longer cookies are indexed, as their reuse is where HPACK
//!    pays). A field the decoder reported as never-indexed keeps that when re-encoded, as
//!    §6.2.3 requires of intermediaries, by passing its flag along;
//! 2. a field found whole in the static table, then in the dynamic table, is sent as an index;
//! 3. a field whose value is usually unique to one message (`content-length`, `date`, `etag`,
//!    `age`, `expires`, `last-modified`, `if-modified-since`, `if-none-match`,
//!    `grpc-timeout`, `x-request-id`, `traceparent`, `:path` with a query), or larger than
//!    three quarters of the table (it would flush everything else), is sent as a literal
//!    without indexing: inserting it would only evict entries that do repeat;
//! 4. anything else is sent as a literal with incremental indexing.
//!
//! Names are taken from the static table when they are there, else from the dynamic table,
//! else written out. Strings are Huffman-coded when that is shorter.

mod decoder;
mod encoder;
mod huffman;
mod primitive;
mod table;

#[cfg(test)]
mod tests;

use std::fmt;

pub use decoder::{Decoder, DecoderLimits};
pub use encoder::{BlockEncoder, Encoder};
pub use table::DynamicTable;

/// The first index of the static table (RFC 7541 Appendix A) with this name, if any: one hash
/// and one comparison. A caller can map the names it meets most to constants of its own
/// with it (the proxy, to the `http` crate's header names).
#[must_use]
pub fn static_name_index(name: &[u8]) -> Option<usize> {
    table::static_name_index(name)
}

use crate::error::{Error, ErrorCode};
use crate::frame::StreamId;

/// The initial `SETTINGS_HEADER_TABLE_SIZE` of both directions (RFC 9113 §6.5.2): what each
/// side may assume until the other's SETTINGS say otherwise. Also our defaults.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// The largest header list accepted by default, as `SETTINGS_MAX_HEADER_LIST_SIZE` counts it:
/// the proxy's limit on an HTTP/1 request head (`DEFAULT_MAX_HEADER_BYTES`), so both engines
/// accept the same requests.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: usize = 64 * 1024;

/// The longest string literal accepted by default: one field can be as large as the whole
/// list, no larger.
pub const DEFAULT_MAX_STRING_LEN: usize = DEFAULT_MAX_HEADER_LIST_SIZE;

/// One header field, lent for the duration of a call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    /// The name (lowercase in HTTP/2; the codec does not check, see [`crate::message`]).
    pub name: &'a [u8],
    /// The value.
    pub value: &'a [u8],
    /// Never to be indexed: the peer sent it as a literal never indexed, or the caller asks
    /// the encoder for that (RFC 7541 §6.2.3).
    pub sensitive: bool,
}

impl<'a> Field<'a> {
    /// A field the encoder may index.
    #[must_use]
    pub const fn new(name: &'a [u8], value: &'a [u8]) -> Self {
        Self {
            name,
            value,
            sensitive: false,
        }
    }

    /// A field that must never be indexed.
    #[must_use]
    pub const fn sensitive(name: &'a [u8], value: &'a [u8]) -> Self {
        Self {
            name,
            value,
            sensitive: true,
        }
    }
}

impl fmt::Debug for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.sensitive {
            &"<sensitive>"
        } else {
            &String::from_utf8_lossy(self.value)
        };
        f.debug_struct("Field")
            .field("name", &String::from_utf8_lossy(self.name))
            .field("value", value)
            .finish()
    }
}

/// Where a [`Decoder`] puts the fields of a block, in order.
///
/// A sink cannot stop decoding: the whole block must be decoded to keep the dynamic table in
/// step with the peer's (RFC 9113 §4.3), so a sink that finds a field it refuses (see
/// [`crate::message::FieldChecker`]) records that and ignores the fields after it. Closures
/// taking a [`Field`] are sinks.
pub trait Sink {
    /// One decoded field; its slices live until the call returns.
    fn field(&mut self, field: Field<'_>);
}

impl<F: FnMut(Field<'_>)> Sink for F {
    fn field(&mut self, field: Field<'_>) {
        self(field);
    }
}

/// Why a header block could not be decoded.
///
/// All but [`DecodeError::HeaderListTooLarge`] leave the decoder's table out of step with
/// the peer's and are connection errors (`COMPRESSION_ERROR`, RFC 9113 §4.3); see
/// [`DecodeError::into_error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The block ends inside a representation.
    Truncated,
    /// An integer above `u32::MAX`, or encoded in more than 6 bytes.
    IntegerOverflow,
    /// An index of no entry (0, or past the end of the dynamic table).
    InvalidIndex(usize),
    /// A Huffman-coded string with EOS, or with bad padding (RFC 7541 §5.2).
    InvalidHuffman,
    /// A string literal longer than [`DecoderLimits::max_string_len`].
    StringTooLong {
        /// The limit.
        limit: usize,
    },
    /// A dynamic table size update above `SETTINGS_HEADER_TABLE_SIZE` (§6.3).
    SizeUpdateTooLarge {
        /// The size asked for.
        size: usize,
        /// The setting.
        limit: usize,
    },
    /// A dynamic table size update after a field of the block (§4.2).
    SizeUpdateNotAtStart,
    /// More than two size updates at the start of a block (§4.2 allows the smallest and the
    /// final size).
    TooManySizeUpdates,
    /// The setting went below the table's size and the block does not begin with the size
    /// update that must follow (§4.2).
    SizeUpdateMissing,
    /// The fields add up to more than [`DecoderLimits::max_header_list_size`]. The block was
    /// decoded to its end, so the table is in step and only the stream fails: a server
    /// answers 431 (RFC 6585), a client resets the stream.
    HeaderListTooLarge {
        /// The limit.
        limit: usize,
    },
}

impl DecodeError {
    /// The protocol error this is, for a block on `stream_id`: a stream `PROTOCOL_ERROR` for
    /// [`DecodeError::HeaderListTooLarge`], a connection `COMPRESSION_ERROR` for the rest.
    #[must_use]
    pub fn into_error(self, stream_id: StreamId) -> Error {
        match self {
            Self::HeaderListTooLarge { .. } => Error::stream(
                stream_id,
                ErrorCode::PROTOCOL_ERROR,
                "header list larger than SETTINGS_MAX_HEADER_LIST_SIZE",
            ),
            other => Error::connection(ErrorCode::COMPRESSION_ERROR, other.reason()),
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "header block ends inside a representation",
            Self::IntegerOverflow => "HPACK integer too large",
            Self::InvalidIndex(_) => "HPACK index of no table entry",
            Self::InvalidHuffman => "invalid Huffman-coded string",
            Self::StringTooLong { .. } => "HPACK string longer than the limit",
            Self::SizeUpdateTooLarge { .. } => {
                "dynamic table size update above SETTINGS_HEADER_TABLE_SIZE"
            }
            Self::SizeUpdateNotAtStart => "dynamic table size update after a header field",
            Self::TooManySizeUpdates => "more than two dynamic table size updates",
            Self::SizeUpdateMissing => "missing dynamic table size update after a lower setting",
            Self::HeaderListTooLarge { .. } => {
                "header list larger than SETTINGS_MAX_HEADER_LIST_SIZE"
            }
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())?;
        match *self {
            Self::InvalidIndex(index) => write!(f, " ({index})"),
            Self::StringTooLong { limit } | Self::HeaderListTooLarge { limit } => {
                write!(f, " ({limit} bytes)")
            }
            Self::SizeUpdateTooLarge { size, limit } => write!(f, " ({size} > {limit})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for DecodeError {}
