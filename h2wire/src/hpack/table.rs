//! The HPACK tables: the static table (RFC 7541 Appendix A) and the dynamic table (§2.3.2,
//! §4).

use std::collections::VecDeque;
use std::fmt;

use crate::message::Verdict;

/// Entries of the static table; HPACK index `i` (1-based) is `STATIC[i - 1]`.
pub(crate) const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The number of static entries: dynamic indexes start after it.
pub(crate) const STATIC_LEN: usize = STATIC.len();

/// The static entry at HPACK index `index` (1-based).
#[inline]
pub(crate) fn static_entry(index: usize) -> Option<(&'static [u8], &'static [u8])> {
    STATIC.get(index.checked_sub(1)?).copied()
}

/// Where a name's first static index is in [`NAME_SLOTS`]: a hash of its length, its second
/// byte and its last, chosen so that the table's 52 names all land apart (checked as the table
/// is built, at compile time). `None` for a name shorter than any in the table.
#[inline]
const fn name_slot(name: &[u8]) -> Option<usize> {
    let ([_, second, ..], Some(last)) = (name, name.last()) else {
        return None;
    };
    let hash = name
        .len()
        .wrapping_mul(5)
        .wrapping_add(*second as usize * 30)
        .wrapping_add(*last as usize);
    Some(hash % 256)
}

const fn same(mut a: &[u8], mut b: &[u8]) -> bool {
    loop {
        match (a.split_first(), b.split_first()) {
            (None, None) => return true,
            (Some((x, rest_a)), Some((y, rest_b))) if *x == *y => {
                a = rest_a;
                b = rest_b;
            }
            _ => return false,
        }
    }
}

/// The first static index of each name, at its [`name_slot`]; 0 where no name lands.
#[expect(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "evaluated at compile time: an index out of bounds fails the build; indexes are \
              at most 61"
)]
static NAME_SLOTS: [u8; 256] = {
    let mut slots = [0u8; 256];
    let mut i = 0;
    while i < STATIC.len() {
        let name = STATIC[i].0;
        let Some(slot) = name_slot(name) else {
            panic!("a static name shorter than 2 bytes");
        };
        if slots[slot] == 0 {
            slots[slot] = (i + 1) as u8;
        } else if !same(STATIC[slots[slot] as usize - 1].0, name) {
            panic!("two static names share a slot: change name_slot's hash");
        }
        i += 1;
    }
    slots
};

/// The first static index with this name: one hash, one comparison (the encoder asks this of
/// every field it writes).
#[must_use]
#[inline]
pub(crate) fn static_name_index(name: &[u8]) -> Option<usize> {
    let index = usize::from(*NAME_SLOTS.get(name_slot(name)?)?);
    static_entry(index)
        .filter(|&(n, _)| n == name)
        .map(|_| index)
}

/// How a field matches the static table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StaticMatch {
    /// No entry has this name.
    None,
    /// This entry has the name, none the value too.
    Name(usize),
    /// This entry has the name and the value.
    Field(usize),
}

/// Looks `name: value` up in the static table.
#[must_use]
pub(crate) fn static_find(name: &[u8], value: &[u8]) -> StaticMatch {
    let Some(first) = static_name_index(name) else {
        return StaticMatch::None;
    };
    // Entries of one name are adjacent: `:method` (2, 3), `:path` (4, 5), `:scheme` (6, 7) and
    // `:status` (8 to 14); every other name has one. Only their values are compared.
    let entries = match first {
        2 | 4 | 6 => 2,
        8 => 7,
        _ => 1,
    };
    (first..first + entries)
        .find(|&index| static_entry(index).is_some_and(|(_, v)| v == value))
        .map_or(StaticMatch::Name(first), StaticMatch::Field)
}

/// The size the RFC accounts an entry at: its name and value lengths plus 32 (§4.1).
#[inline]
#[must_use]
pub(crate) fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len().saturating_add(value.len()).saturating_add(32)
}

/// The position in a buffer of `capacity` bytes of virtual offset `offset`.
fn physical(offset: u64, capacity: usize) -> usize {
    offset
        .checked_rem(capacity as u64)
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(0)
}

/// Where an entry's bytes are in [`DynamicTable`]'s storage.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Virtual offset of the name's first byte (see [`DynamicTable`]).
    start: u64,
    name_len: usize,
    value_len: usize,
    /// What the decoder's checks made of the field ([`crate::message::judge`]), so that it
    /// is judged once however often it is indexed; `None` in an encoder's table.
    verdict: Option<Verdict>,
}

impl Slot {
    fn len(&self) -> usize {
        self.name_len + self.value_len
    }

    fn end(&self) -> u64 {
        self.start + self.len() as u64
    }

    fn size(&self) -> usize {
        self.len() + 32
    }
}

/// The HPACK dynamic table (RFC 7541 §2.3.2): a first-in, first-out list of fields, bounded
/// by a size counted as 32 plus the name and value lengths of each entry (§4.1).
///
/// A ring buffer: the entries' bytes (name, then value) live contiguously in one byte buffer
/// used as a ring, and their positions in a ring of slots ([`VecDeque`]), so inserting and
/// evicting allocate nothing once the buffer has grown and every entry can be lent out as
/// two slices. Offsets are virtual (they only grow; the byte at offset `o` is at
/// `o % capacity`), and an entry that would straddle the end of the buffer starts at the next
/// lap instead. With a buffer of twice the table's maximum size an entry always fits after
/// eviction (the wasted tail is shorter than one entry, and the live bytes plus the new entry
/// are at most the maximum size), so the buffer grows by doubling up to that and is re-packed
/// only while it grows.
///
/// Equality compares the contents (entries and sizes), not the layout.
#[derive(Clone)]
pub struct DynamicTable {
    /// Oldest at the front, newest at the back.
    slots: VecDeque<Slot>,
    bytes: Vec<u8>,
    /// Virtual offset where the next entry may start.
    tail: u64,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    /// An empty table of at most `max_size` (accounted) bytes.
    #[must_use]
    pub fn new(max_size: usize) -> Self {
        Self {
            slots: VecDeque::new(),
            bytes: Vec::new(),
            tail: 0,
            size: 0,
            max_size,
        }
    }

    /// The accounted size of the entries (§4.1).
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }

    /// The current maximum size (the last dynamic table size update).
    #[must_use]
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// The number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The entry `index` places from the newest (0: the newest, HPACK index 62).
    #[must_use]
    pub fn get(&self, index: usize) -> Option<(&[u8], &[u8])> {
        self.get_judged(index).map(|(name, value, _)| (name, value))
    }

    /// The entry `index` places from the newest, with the verdict it was inserted with.
    pub(crate) fn get_judged(&self, index: usize) -> Option<super::decoder::Judged<'_>> {
        let position = self.slots.len().checked_sub(1)?.checked_sub(index)?;
        let slot = self.slots.get(position)?;
        let (name, value) = self.slot_bytes(slot)?;
        Some((name, value, slot.verdict))
    }

    /// The entries, newest first (the order of their HPACK indexes).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.slots
            .iter()
            .rev()
            .filter_map(|slot| self.slot_bytes(slot))
    }

    fn slot_bytes(&self, slot: &Slot) -> Option<(&[u8], &[u8])> {
        let start = self.physical(slot.start);
        let entry = self.bytes.get(start..start.checked_add(slot.len())?)?;
        entry.split_at_checked(slot.name_len)
    }

    fn physical(&self, offset: u64) -> usize {
        physical(offset, self.bytes.len())
    }

    /// Changes the maximum size, evicting the oldest entries until the table fits (§4.3).
    pub fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        while self.size > self.max_size {
            self.evict();
        }
        if max_size == 0 {
            // Give the memory back: a table of size 0 holds nothing.
            self.bytes = Vec::new();
        }
    }

    fn evict(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            self.size -= slot.size();
        }
        if self.slots.is_empty() {
            self.tail = 0;
        }
    }

    /// Inserts a field as the newest entry, evicting the oldest ones to make room (§4.4). A
    /// field larger than the maximum size empties the table and is not inserted.
    pub fn insert(&mut self, name: &[u8], value: &[u8]) {
        self.insert_judged(name, value, None);
    }

    /// [`DynamicTable::insert`], remembering the field's `verdict`.
    pub(crate) fn insert_judged(&mut self, name: &[u8], value: &[u8], verdict: Option<Verdict>) {
        let size = entry_size(name, value);
        if size > self.max_size {
            while !self.slots.is_empty() {
                self.evict();
            }
            return;
        }
        while self.size + size > self.max_size {
            self.evict();
        }
        let len = name.len() + value.len();
        let start = self.place(len);
        let at = self.physical(start);
        if let Some(dst) = self.bytes.get_mut(at..at + len) {
            let (name_dst, value_dst) = dst.split_at_mut(name.len());
            name_dst.copy_from_slice(name);
            value_dst.copy_from_slice(value);
        }
        self.slots.push_back(Slot {
            start,
            name_len: name.len(),
            value_len: value.len(),
            verdict,
        });
        self.size += size;
        self.debug_check();
    }

    /// Reserves `len` contiguous bytes after the newest entry and returns their virtual
    /// offset; `self.tail` moves past them.
    fn place(&mut self, len: usize) -> u64 {
        let capacity = self.bytes.len() as u64;
        let head = self.slots.front().map_or(self.tail, |slot| slot.start);
        let mut start = self.tail;
        if let Some(offset) = start.checked_rem(capacity)
            && offset + len as u64 > capacity
        {
            start += capacity - offset;
        }
        if (start + len as u64).saturating_sub(head) <= capacity {
            self.tail = start + len as u64;
            return start;
        }
        self.repack(len)
    }

    /// Moves the live entries to the start of a larger buffer and places `len` bytes after
    /// them.
    fn repack(&mut self, len: usize) -> u64 {
        let live: usize = self.slots.iter().map(Slot::len).sum();
        let needed = live + len;
        let capacity = needed
            .max(self.bytes.len().saturating_mul(2))
            .max(256)
            .min(self.max_size.saturating_mul(2))
            .max(needed);
        let old = std::mem::replace(&mut self.bytes, vec![0; capacity]);
        let mut offset = 0;
        for slot in &mut self.slots {
            let from = physical(slot.start, old.len());
            let to = offset + slot.len();
            if let (Some(dst), Some(src)) = (
                self.bytes.get_mut(offset..to),
                old.get(from..from + slot.len()),
            ) {
                dst.copy_from_slice(src);
            }
            slot.start = offset as u64;
            offset = to;
        }
        self.tail = (offset + len) as u64;
        offset as u64
    }

    /// The invariants, checked in debug builds after every change.
    fn debug_check(&self) {
        if cfg!(debug_assertions) {
            let size: usize = self.slots.iter().map(Slot::size).sum();
            debug_assert_eq!(size, self.size);
            debug_assert!(self.size <= self.max_size);
            if let (Some(front), Some(back)) = (self.slots.front(), self.slots.back()) {
                debug_assert!(back.end() - front.start <= self.bytes.len() as u64);
                debug_assert!(back.end() <= self.tail);
            }
        }
    }

    /// Looks `name: value` up: the index (0: newest) of an entry with both, else of the
    /// newest entry with the name. A scan from the newest entry, comparing lengths first: a
    /// table of the default 4 KiB holds a few dozen entries.
    #[must_use]
    pub(crate) fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
        let mut name_match = None;
        for (index, slot) in self.slots.iter().rev().enumerate() {
            if slot.name_len != name.len() {
                continue;
            }
            let Some((n, v)) = self.slot_bytes(slot) else {
                continue;
            };
            if n != name {
                continue;
            }
            if slot.value_len == value.len() && v == value {
                return (Some(index), name_match.or(Some(index)));
            }
            if name_match.is_none() {
                name_match = Some(index);
            }
        }
        (None, name_match)
    }
}

impl PartialEq for DynamicTable {
    fn eq(&self, other: &Self) -> bool {
        self.size == other.size
            && self.max_size == other.max_size
            && self.len() == other.len()
            && self.iter().eq(other.iter())
    }
}

impl Eq for DynamicTable {}

impl fmt::Debug for DynamicTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Lossy<'a>(&'a [u8]);
        impl fmt::Debug for Lossy<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&String::from_utf8_lossy(self.0), f)
            }
        }
        f.debug_struct("DynamicTable")
            .field("size", &self.size)
            .field("max_size", &self.max_size)
            .field(
                "entries",
                &self
                    .iter()
                    .map(|(n, v)| (Lossy(n), Lossy(v)))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn static_lookups() {
        assert_eq!(static_find(b":method", b"GET"), StaticMatch::Field(2));
        assert_eq!(static_find(b":method", b"POST"), StaticMatch::Field(3));
        assert_eq!(static_find(b":method", b"PUT"), StaticMatch::Name(2));
        assert_eq!(static_find(b":path", b"/"), StaticMatch::Field(4));
        assert_eq!(static_find(b":scheme", b"http"), StaticMatch::Field(6));
        assert_eq!(static_find(b":status", b"200"), StaticMatch::Field(8));
        assert_eq!(static_find(b":status", b"500"), StaticMatch::Field(14));
        assert_eq!(static_find(b":status", b"503"), StaticMatch::Name(8));
        assert_eq!(static_find(b"content-type", b"x"), StaticMatch::Name(31));
        assert_eq!(static_find(b"accept", b""), StaticMatch::Field(19));
        assert_eq!(static_find(b"grpc-status", b"0"), StaticMatch::None);
        assert_eq!(static_find(b"Content-Type", b"x"), StaticMatch::None);
        // The hashed index agrees with a plain scan for every name, and the lookup for every
        // entry, and for each name with a value no entry has.
        for (i, (name, value)) in STATIC.iter().enumerate() {
            let first = STATIC.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name_index(name), Some(first), "entry {}", i + 1);
            assert_eq!(static_find(name, value), StaticMatch::Field(i + 1));
            assert_eq!(
                static_find(name, b"none-has-this"),
                StaticMatch::Name(first)
            );
        }
    }

    #[test]
    fn eviction_and_oversized_entries() {
        let mut table = DynamicTable::new(100);
        table.insert(b"aaaa", b"bbbb"); // 40
        table.insert(b"cccc", b"dddd"); // 40
        assert_eq!(table.size(), 80);
        table.insert(b"eeee", b"ffff"); // evicts the oldest
        assert_eq!(
            table.iter().collect::<Vec<_>>(),
            [(&b"eeee"[..], &b"ffff"[..]), (b"cccc", b"dddd")]
        );
        assert_eq!(table.get(1), Some((&b"cccc"[..], &b"dddd"[..])));
        assert_eq!(table.get(2), None);
        table.insert(&[b'x'; 60], &[b'y'; 9]); // 101 > 100: empties the table
        assert!(table.is_empty());
        assert_eq!(table.size(), 0);
        table.insert(&[b'x'; 60], &[b'y'; 8]); // exactly 100
        assert_eq!(table.size(), 100);
        table.set_max_size(50);
        assert!(table.is_empty());
    }

    #[test]
    fn find_prefers_full_matches() {
        let mut table = DynamicTable::new(4096);
        table.insert(b"x-a", b"1");
        table.insert(b"x-a", b"2");
        table.insert(b"x-b", b"3");
        assert_eq!(table.find(b"x-a", b"1"), (Some(2), Some(1)));
        assert_eq!(table.find(b"x-a", b"9"), (None, Some(1)));
        assert_eq!(table.find(b"x-c", b"1"), (None, None));
    }

    /// A plain model of the table: a list of owned entries.
    #[derive(Default)]
    struct Model {
        entries: VecDeque<(Vec<u8>, Vec<u8>)>,
        max: usize,
    }

    impl Model {
        fn size(&self) -> usize {
            self.entries.iter().map(|(n, v)| entry_size(n, v)).sum()
        }
        fn shrink(&mut self) {
            while self.size() > self.max {
                self.entries.pop_back();
            }
        }
        fn insert(&mut self, name: &[u8], value: &[u8]) {
            if entry_size(name, value) > self.max {
                self.entries.clear();
                return;
            }
            self.entries.push_front((name.to_vec(), value.to_vec()));
            while self.size() > self.max {
                self.entries.pop_back();
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(usize, usize),
        Resize(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..80, 0usize..120).prop_map(|(n, v)| Op::Insert(n, v)),
            1 => (0usize..600).prop_map(Op::Resize),
        ]
    }

    proptest! {
        /// The ring buffer holds exactly what a plain list would, through inserts of every
        /// size, wraps, evictions and resizes.
        #[test]
        fn matches_a_plain_list(max in 0usize..600, ops in proptest::collection::vec(op(), 0..200)) {
            let mut table = DynamicTable::new(max);
            let mut model = Model { max, ..Model::default() };
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(n, v) => {
                        let name = vec![b"abcdefghijklmnopqrstuvwxyz"[i % 26]; n];
                        let value = vec![b"0123456789"[i % 10]; v];
                        table.insert(&name, &value);
                        model.insert(&name, &value);
                    }
                    Op::Resize(max) => {
                        table.set_max_size(max);
                        model.max = max;
                        model.shrink();
                    }
                }
                prop_assert_eq!(table.size(), model.size());
                prop_assert!(table.iter().eq(model.entries.iter().map(|(n, v)| (&n[..], &v[..]))));
            }
        }
    }
}
