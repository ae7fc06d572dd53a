//! The HPACK decoder (RFC 7541 §3, §6).

use std::sync::LazyLock;

use super::primitive::Cursor;
use super::table::{DynamicTable, STATIC_LEN, entry_size, static_entry};
use super::{
    DEFAULT_MAX_HEADER_LIST_SIZE, DEFAULT_MAX_STRING_LEN, DEFAULT_TABLE_SIZE, DecodeError, Field,
    Sink,
};
use crate::message::{Verdict, judge};

/// What a [`Decoder`] accepts from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Our `SETTINGS_HEADER_TABLE_SIZE`: the largest dynamic table the peer may use
    /// (default [`DEFAULT_TABLE_SIZE`]). Until the peer acknowledges a SETTINGS frame with
    /// another value, the decoder must be created with the default.
    pub max_table_size: usize,
    /// Our `SETTINGS_MAX_HEADER_LIST_SIZE`: the most a block's fields may add up to, counting
    /// each as its name and value lengths plus 32 (default
    /// [`DEFAULT_MAX_HEADER_LIST_SIZE`]).
    pub max_header_list_size: usize,
    /// The longest string literal, before or after Huffman decoding (default
    /// [`DEFAULT_MAX_STRING_LEN`]).
    pub max_string_len: usize,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self {
            max_table_size: DEFAULT_TABLE_SIZE,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_string_len: DEFAULT_MAX_STRING_LEN,
        }
    }
}

/// Decodes the header blocks of one direction of a connection.
///
/// ```
/// use conduit_h2::hpack::{Decoder, DecoderLimits, Field};
///
/// let mut decoder = Decoder::new(DecoderLimits::default());
/// let mut fields = Vec::new();
/// // RFC 7541 C.3.1: `:method GET`, `:scheme http`, `:path /`, then
/// // `:authority www.example.com` as a literal with incremental indexing.
/// let block = b"\x82\x86\x84\x41\x0fwww.example.com";
/// decoder
///     .decode(block, |f: Field<'_>| fields.push((f.name.to_vec(), f.value.to_vec())))
///     .unwrap();
/// assert_eq!(fields[3], (b":authority".to_vec(), b"www.example.com".to_vec()));
/// assert_eq!(decoder.table().len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct Decoder {
    table: DynamicTable,
    limits: DecoderLimits,
    /// The setting went below the table's size: the next block must start with an update.
    size_update_required: bool,
    /// Huffman-decoded names, and dynamic-table names copied out for an insertion.
    name_scratch: Vec<u8>,
    /// Huffman-decoded values.
    value_scratch: Vec<u8>,
}

impl Decoder {
    /// A decoder whose table starts at `limits.max_table_size`.
    #[must_use]
    pub fn new(limits: DecoderLimits) -> Self {
        Self {
            table: DynamicTable::new(limits.max_table_size),
            limits,
            size_update_required: false,
            name_scratch: Vec::new(),
            value_scratch: Vec::new(),
        }
    }

    /// The dynamic table.
    #[must_use]
    pub fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> DecoderLimits {
        self.limits
    }

    /// Applies a new `SETTINGS_HEADER_TABLE_SIZE` of ours, once the peer has acknowledged it.
    /// If the table is now larger than the setting, the peer's next block must begin with a
    /// dynamic table size update that fits (RFC 7541 §4.2).
    pub fn set_max_table_size(&mut self, max_table_size: usize) {
        self.limits.max_table_size = max_table_size;
        if self.table.max_size() > max_table_size {
            self.size_update_required = true;
        }
    }

    /// Applies a new `SETTINGS_MAX_HEADER_LIST_SIZE` of ours.
    pub fn set_max_header_list_size(&mut self, max_header_list_size: usize) {
        self.limits.max_header_list_size = max_header_list_size;
    }

    /// Decodes one complete header block (after [`crate::block::BlockAssembler`] has joined its
    /// HEADERS and CONTINUATION fragments), giving each field to `sink` in order.
    ///
    /// # Errors
    ///
    /// [`DecodeError`]: the table is then out of step with the peer's and the connection must
    /// end, except for [`DecodeError::HeaderListTooLarge`], after which the block has been
    /// decoded to its end (the fields past the limit are not given to `sink`).
    pub fn decode<S: Sink>(&mut self, block: &[u8], mut sink: S) -> Result<(), DecodeError> {
        self.decode_judged(block, |field, _| sink.field(field))
    }

    /// [`Decoder::decode`], giving each field from a table with what
    /// [`crate::message::judge`] made of it: judged once, as it entered the dynamic table
    /// (the static table's entries once per process), so that a field indexed again, as most
    /// are, is not checked again. Literals not indexed come without a verdict.
    pub(crate) fn decode_judged(
        &mut self,
        block: &[u8],
        mut sink: impl FnMut(Field<'_>, Option<Verdict>),
    ) -> Result<(), DecodeError> {
        let mut cursor = Cursor::new(block);
        let mut list_size: usize = 0;
        let mut too_large = false;
        let mut at_start = true;
        let mut size_updates = 0;
        let Self {
            table,
            limits,
            size_update_required,
            name_scratch,
            value_scratch,
        } = self;

        while let Some(first) = cursor.byte() {
            if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                if !at_start {
                    return Err(DecodeError::SizeUpdateNotAtStart);
                }
                size_updates += 1;
                if size_updates > 2 {
                    return Err(DecodeError::TooManySizeUpdates);
                }
                let size = cursor.integer(first, 5)?;
                if size > limits.max_table_size {
                    return Err(DecodeError::SizeUpdateTooLarge {
                        size,
                        limit: limits.max_table_size,
                    });
                }
                table.set_max_size(size);
                *size_update_required = false;
                continue;
            }
            if at_start {
                if *size_update_required {
                    return Err(DecodeError::SizeUpdateMissing);
                }
                at_start = false;
            }

            let (field, verdict) = if first & 0x80 != 0 {
                // Indexed header field (§6.1).
                let index = cursor.integer(first, 7)?;
                let (name, value, verdict) = lookup_judged(table, index)?;
                (Field::new(name, value), verdict)
            } else {
                // Literal header field (§6.2): with incremental indexing (01), without
                // indexing (0000) or never indexed (0001).
                let indexing = first & 0xc0 == 0x40;
                let sensitive = !indexing && first & 0x10 != 0;
                let name_index = cursor.integer(first, if indexing { 6 } else { 4 })?;
                let max_len = limits.max_string_len;
                if indexing {
                    // The name cannot stay borrowed from the table that is about to change.
                    let name: &[u8] = if name_index == 0 {
                        cursor.string(name_scratch, max_len)?
                    } else {
                        match static_entry(name_index) {
                            Some((name, _)) => name,
                            None => {
                                let (name, _) = lookup(table, name_index)?;
                                name_scratch.clear();
                                name_scratch.extend_from_slice(name);
                                name_scratch.as_slice()
                            }
                        }
                    };
                    let value = cursor.string(value_scratch, max_len)?;
                    let verdict = judge(name, value);
                    table.insert_judged(name, value, Some(verdict));
                    (Field::new(name, value), Some(verdict))
                } else {
                    let name: &[u8] = if name_index == 0 {
                        cursor.string(name_scratch, max_len)?
                    } else {
                        lookup(table, name_index)?.0
                    };
                    let value = cursor.string(value_scratch, max_len)?;
                    let field = Field {
                        name,
                        value,
                        sensitive,
                    };
                    (field, None)
                }
            };

            list_size = list_size.saturating_add(entry_size(field.name, field.value));
            if list_size > limits.max_header_list_size {
                // Keep decoding (the table must stay in step), but give nothing more.
                too_large = true;
            }
            if !too_large {
                sink(field, verdict);
            }
        }
        if at_start && *size_update_required {
            // A block of nothing but (no) updates still had to carry the required one.
            return Err(DecodeError::SizeUpdateMissing);
        }
        if too_large {
            return Err(DecodeError::HeaderListTooLarge {
                limit: limits.max_header_list_size,
            });
        }
        Ok(())
    }
}

/// The verdicts on the static table's entries, by HPACK index (0 unused).
static STATIC_VERDICTS: LazyLock<[Verdict; STATIC_LEN + 1]> = LazyLock::new(|| {
    let mut verdicts = [Verdict::Regular; STATIC_LEN + 1];
    for (index, verdict) in verdicts.iter_mut().enumerate().skip(1) {
        if let Some((name, value)) = static_entry(index) {
            *verdict = judge(name, value);
        }
    }
    verdicts
});

/// A table entry's name and value, and its verdict when it has one.
pub(crate) type Judged<'t> = (&'t [u8], &'t [u8], Option<Verdict>);

/// [`lookup`], with the entry's verdict when it has one.
#[inline]
fn lookup_judged(table: &DynamicTable, index: usize) -> Result<Judged<'_>, DecodeError> {
    if index <= STATIC_LEN {
        let (name, value) = static_entry(index).ok_or(DecodeError::InvalidIndex(index))?;
        return Ok((name, value, STATIC_VERDICTS.get(index).copied()));
    }
    table
        .get_judged(index - STATIC_LEN - 1)
        .ok_or(DecodeError::InvalidIndex(index))
}

/// The entry at HPACK index `index`: static (1 to 61), then dynamic (62 on, newest first).
#[inline]
fn lookup(table: &DynamicTable, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
    if index <= STATIC_LEN {
        return static_entry(index).ok_or(DecodeError::InvalidIndex(index));
    }
    table
        .get(index - STATIC_LEN - 1)
        .ok_or(DecodeError::InvalidIndex(index))
}
