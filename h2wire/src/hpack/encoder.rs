//! The HPACK encoder (RFC 7541 §6), with the policy described in [`super`].

use std::fmt;

use bytes::BufMut;

use super::primitive::{encode_integer, encode_raw, encode_string};
use super::table::{DynamicTable, STATIC_LEN, StaticMatch, entry_size, static_find};
use super::{DEFAULT_TABLE_SIZE, Field};

/// Encodes the header blocks of one direction of a connection.
///
/// ```
/// use conduit_h2::hpack::{Decoder, DecoderLimits, Encoder, Field};
///
/// let mut encoder = Encoder::new(4096);
/// let fields = [
///     Field::new(b":method", b"POST"),
///     Field::new(b":path", b"/pkg.Service/Method"),
///     Field::sensitive(b"x-token", b"secret"),
/// ];
/// let mut block = Vec::new();
/// encoder.encode(fields, &mut block);
///
/// let mut decoder = Decoder::new(DecoderLimits::default());
/// let mut decoded = Vec::new();
/// decoder.decode(&block, |f: Field<'_>| decoded.push(f.sensitive)).unwrap();
/// assert_eq!(decoded, [false, false, true]);
/// assert_eq!(decoder.table(), encoder.table());
/// ```
#[derive(Clone, Debug)]
pub struct Encoder {
    table: DynamicTable,
    /// Our own bound on the table size: memory per connection.
    preferred_max: usize,
    /// The table size the peer's decoder knows of: the last one signaled (initially the
    /// protocol's default).
    signaled: usize,
    /// The smallest table size since the last block.
    min_since: usize,
}

impl Encoder {
    /// An encoder whose table holds at most `max_table_size` bytes, whatever the peer allows.
    /// Until [`Encoder::set_max_table_size`] is called the peer is assumed to allow the
    /// default ([`DEFAULT_TABLE_SIZE`]).
    #[must_use]
    pub fn new(max_table_size: usize) -> Self {
        let size = max_table_size.min(DEFAULT_TABLE_SIZE);
        Self {
            table: DynamicTable::new(size),
            preferred_max: max_table_size,
            signaled: DEFAULT_TABLE_SIZE,
            min_since: size,
        }
    }

    /// The dynamic table.
    #[must_use]
    pub fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// Applies the peer's `SETTINGS_HEADER_TABLE_SIZE` (each one, in the order received). The
    /// table shrinks at once (evicting entries); the change is signaled at the start of the
    /// next block.
    pub fn set_max_table_size(&mut self, peer_setting: usize) {
        let size = peer_setting.min(self.preferred_max);
        self.table.set_max_size(size);
        self.min_since = self.min_since.min(size);
    }

    /// Starts a header block in `dst`, writing the pending dynamic table size updates (they
    /// must open a block, RFC 7541 §4.2); its fields are then written one by one. Use this to
    /// re-encode fields as a [`super::Decoder`] lends them, with no list in between.
    pub fn block<'e, B: BufMut>(&'e mut self, dst: &'e mut B) -> BlockEncoder<'e, B> {
        let size = self.table.max_size();
        if self.min_since < size {
            encode_integer(self.min_since, 5, 0x20, dst);
            encode_integer(size, 5, 0x20, dst);
        } else if size != self.signaled {
            encode_integer(size, 5, 0x20, dst);
        }
        self.signaled = size;
        self.min_since = size;
        BlockEncoder { encoder: self, dst }
    }

    /// Encodes a whole header block into `dst`.
    pub fn encode<'f, B: BufMut>(
        &mut self,
        fields: impl IntoIterator<Item = Field<'f>>,
        dst: &mut B,
    ) {
        let mut block = self.block(dst);
        for field in fields {
            block.field(field);
        }
    }

    fn field(&mut self, field: Field<'_>, dst: &mut impl BufMut) {
        let Field { name, value, .. } = field;
        let sensitive = field.sensitive || is_sensitive(name, value);
        let static_match = static_find(name, value);
        if let (StaticMatch::Field(index), false) = (static_match, sensitive) {
            encode_integer(index, 7, 0x80, dst);
            return;
        }
        let (dynamic_field, dynamic_name) = if self.table.is_empty() {
            (None, None)
        } else {
            self.table.find(name, value)
        };
        if let (Some(index), false) = (dynamic_field, sensitive) {
            encode_integer(STATIC_LEN + 1 + index, 7, 0x80, dst);
            return;
        }
        let name_index = match static_match {
            StaticMatch::Name(index) | StaticMatch::Field(index) => Some(index),
            StaticMatch::None => dynamic_name.map(|index| STATIC_LEN + 1 + index),
        };
        let insert = !sensitive && self.worth_indexing(name, value);
        let (flags, prefix_bits) = match (sensitive, insert) {
            (true, _) => (0x10, 4),
            (false, true) => (0x40, 6),
            (false, false) => (0x00, 4),
        };
        encode_integer(name_index.unwrap_or(0), prefix_bits, flags, dst);
        // Huffman coding pays for strings sent once and then referenced from the table; a
        // string sent with every message is written as it is (the CPU matters more than
        // the few bytes).
        let string = if insert { encode_string } else { encode_raw };
        if name_index.is_none() {
            string(name, dst);
        }
        string(value, dst);
        if insert {
            self.table.insert(name, value);
        }
    }

    /// Whether inserting the field is likely to pay: its value repeats across messages, and
    /// it does not flush most of the table.
    fn worth_indexing(&self, name: &[u8], value: &[u8]) -> bool {
        if entry_size(name, value) > self.table.max_size() / 4 * 3 {
            return false;
        }
        !match name {
            b":path" => value.contains(&b'?'),
            b"content-length" | b"date" | b"etag" | b"age" | b"expires" | b"last-modified"
            | b"if-modified-since" | b"if-none-match" | b"grpc-timeout" | b"x-request-id"
            | b"traceparent" => true,
            _ => false,
        }
    }
}

/// Fields that must never be indexed, whatever the caller says (see [`super`]).
fn is_sensitive(name: &[u8], value: &[u8]) -> bool {
    match name {
        b"authorization" | b"proxy-authorization" => true,
        b"cookie" => value.len() < 20,
        _ => false,
    }
}

/// A header block being written: see [`Encoder::block`].
pub struct BlockEncoder<'e, B> {
    encoder: &'e mut Encoder,
    dst: &'e mut B,
}

impl<B: BufMut> BlockEncoder<'_, B> {
    /// Encodes the next field of the block.
    pub fn field(&mut self, field: Field<'_>) {
        self.encoder.field(field, self.dst);
    }
}

impl<B> fmt::Debug for BlockEncoder<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockEncoder")
            .field("encoder", &self.encoder)
            .finish_non_exhaustive()
    }
}
