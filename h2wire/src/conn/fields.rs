//! A decoded header list, owned: one buffer for every name and value, so that values can be
//! handed on as slices of it without a copy each, and the regular fields' places after them
//! in the same buffer (one allocation per list).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::hpack::Field;
use crate::message::{
    FieldChecker, FieldKind, MalformedMessage, MessageKind, Pseudo, Verdict, judge,
};

/// One field's place in the buffer: its name, then its value right after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    start: u32,
    name_end: u32,
    end: u32,
    sensitive: bool,
}

/// The bytes of one place record after the fields: start, end of name, end of value (its top
/// bit the sensitive flag), each a little-endian `u32`.
const RECORD: usize = 12;
const SENSITIVE: u32 = 1 << 31;

impl Place {
    fn write(self, buf: &mut BytesMut) {
        buf.extend_from_slice(&self.start.to_le_bytes());
        buf.extend_from_slice(&self.name_end.to_le_bytes());
        let end = self.end | if self.sensitive { SENSITIVE } else { 0 };
        buf.extend_from_slice(&end.to_le_bytes());
    }

    fn read(record: &[u8]) -> Self {
        let word = |i: usize| {
            let mut bytes = [0; 4];
            if let Some(slice) = record.get(i * 4..i * 4 + 4) {
                bytes.copy_from_slice(slice);
            }
            u32::from_le_bytes(bytes)
        };
        let end = word(2);
        Self {
            start: word(0),
            name_end: word(1),
            end: end & !SENSITIVE,
            sensitive: end & SENSITIVE != 0,
        }
    }

    fn name(self) -> Range<usize> {
        self.start as usize..self.name_end as usize
    }

    fn value(self) -> Range<usize> {
        self.name_end as usize..self.end as usize
    }
}

/// The fields of one header block (a request's or response's head, or trailers), checked
/// (RFC 9113 §8.2, §8.3): pseudo-header fields by name, then the regular fields in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderList {
    /// Every name and value, then the regular fields' places (`RECORD` bytes each).
    buf: Bytes,
    /// Where the places begin.
    fields_end: usize,
    /// `:method`, `:scheme`, `:authority`, `:path`, `:status`.
    pseudo: [Option<Place>; 5],
    content_length: Option<u64>,
}

fn pseudo_index(pseudo: Pseudo) -> usize {
    match pseudo {
        Pseudo::Method => 0,
        Pseudo::Scheme => 1,
        Pseudo::Authority => 2,
        Pseudo::Path => 3,
        Pseudo::Status => 4,
    }
}

impl HeaderList {
    fn pseudo(&self, pseudo: Pseudo) -> Option<&[u8]> {
        let place = (*self.pseudo.get(pseudo_index(pseudo))?)?;
        self.buf.get(place.value())
    }

    /// A pseudo-header field's value as a slice of the list's buffer (no copy).
    #[must_use]
    pub fn pseudo_bytes(&self, pseudo: Pseudo) -> Option<Bytes> {
        let place = (*self.pseudo.get(pseudo_index(pseudo))?)?;
        Some(self.buf.slice(place.value()))
    }

    /// `:method`.
    #[must_use]
    pub fn method(&self) -> Option<&[u8]> {
        self.pseudo(Pseudo::Method)
    }

    /// `:scheme`.
    #[must_use]
    pub fn scheme(&self) -> Option<&[u8]> {
        self.pseudo(Pseudo::Scheme)
    }

    /// `:authority`.
    #[must_use]
    pub fn authority(&self) -> Option<&[u8]> {
        self.pseudo(Pseudo::Authority)
    }

    /// `:path`.
    #[must_use]
    pub fn path(&self) -> Option<&[u8]> {
        self.pseudo(Pseudo::Path)
    }

    /// `:status`, as a number.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        // Checked as three digits when the list was collected.
        let &[hundreds, tens, units] = self.pseudo(Pseudo::Status)? else {
            return None;
        };
        let digit = |b: u8| b.is_ascii_digit().then(|| u16::from(b - b'0'));
        Some(digit(hundreds)? * 100 + digit(tens)? * 10 + digit(units)?)
    }

    /// `content-length`, when present (every copy of it agreed).
    #[must_use]
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// How many regular fields there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records().len() / RECORD
    }

    /// Whether there are no regular fields.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }

    fn records(&self) -> &[u8] {
        self.buf.get(self.fields_end..).unwrap_or_default()
    }

    /// The regular fields in order: name (lower case, checked), value (as a slice of the
    /// list's buffer: no copy), and whether the peer marked it never-indexed.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Bytes, bool)> + '_ {
        self.records().chunks_exact(RECORD).map(|record| {
            let place = Place::read(record);
            let name = self.buf.get(place.name()).unwrap_or_default();
            (name, self.buf.slice(place.value()), place.sensitive)
        })
    }
}

/// Collects a block's fields into a [`HeaderList`] as the decoder lends them, checking each.
pub(crate) struct Collector {
    checker: FieldChecker,
    buf: BytesMut,
    list: HeaderList,
    /// The regular fields' places until the list is finished: the first `INLINE` here, the
    /// rest spilled (a block with that many fields is rare).
    inline: [Place; INLINE],
    count: usize,
    spilled: Vec<Place>,
    pub(crate) malformed: Option<MalformedMessage>,
}

const INLINE: usize = 24;

impl Collector {
    pub(crate) fn new(kind: MessageKind, block_len: usize) -> Self {
        // Sized once for the common block, so that filling it does not reallocate: a field
        // indexed in a table takes one or two bytes in the block and dozens decoded, and
        // its place takes `RECORD` more.
        let capacity = block_len.saturating_mul(8).clamp(256, 16 * 1024);
        let unset = Place {
            start: 0,
            name_end: 0,
            end: 0,
            sensitive: false,
        };
        Self {
            checker: FieldChecker::new(kind),
            buf: BytesMut::with_capacity(capacity),
            list: HeaderList::default(),
            inline: [unset; INLINE],
            count: 0,
            spilled: Vec::new(),
            malformed: None,
        }
    }

    /// The next field, with what [`judge`] made of it if the decoder's table remembered it.
    pub(crate) fn field(&mut self, field: Field<'_>, verdict: Option<Verdict>) {
        if self.malformed.is_some() {
            return;
        }
        let verdict = verdict.unwrap_or_else(|| judge(field.name, field.value));
        let kind = match self.checker.check_judged(verdict, field.value) {
            Ok(kind) => kind,
            Err(err) => {
                self.malformed = Some(err);
                return;
            }
        };
        let start = self.buf.len();
        self.buf.extend_from_slice(field.name);
        let name_end = self.buf.len();
        self.buf.extend_from_slice(field.value);
        let (Ok(start), Ok(name_end), Ok(end)) = (
            u32::try_from(start),
            u32::try_from(name_end),
            u32::try_from(self.buf.len()),
        ) else {
            self.malformed = Some(MalformedMessage::InvalidValue);
            return;
        };
        // The top bit of a record's end is the sensitive flag.
        if end & SENSITIVE != 0 {
            self.malformed = Some(MalformedMessage::InvalidValue);
            return;
        }
        let place = Place {
            start,
            name_end,
            end,
            sensitive: field.sensitive,
        };
        match kind {
            FieldKind::Pseudo(pseudo) => {
                if let Some(slot) = self.list.pseudo.get_mut(pseudo_index(pseudo)) {
                    *slot = Some(place);
                }
            }
            FieldKind::Regular => {
                if field.name == b"content-length" {
                    let parsed = std::str::from_utf8(field.value)
                        .ok()
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok());
                    match (parsed, self.list.content_length) {
                        (Some(len), None) => self.list.content_length = Some(len),
                        (Some(len), Some(before)) if len == before => {}
                        _ => {
                            self.malformed = Some(MalformedMessage::InvalidValue);
                            return;
                        }
                    }
                }
                match self.inline.get_mut(self.count) {
                    Some(slot) => *slot = place,
                    None => self.spilled.push(place),
                }
                self.count += 1;
            }
        }
    }

    /// The list, or why the message is malformed.
    pub(crate) fn finish(mut self) -> Result<HeaderList, MalformedMessage> {
        if let Some(err) = self.malformed {
            return Err(err);
        }
        self.checker.finish()?;
        self.list.fields_end = self.buf.len();
        self.buf.reserve(self.count * RECORD);
        let inline = self.inline.get(..self.count).unwrap_or(&self.inline);
        for &place in inline.iter().chain(&self.spilled) {
            place.write(&mut self.buf);
        }
        self.list.buf = self.buf.freeze();
        Ok(self.list)
    }
}
