//! The stream identifier, shared by the frame layer and its errors (re-exported by the
//! frame module, where callers name it).

use core::fmt;

/// The 31 bits an identifier has.
const MASK: u32 = 0x7fff_ffff;

/// A stream identifier: 31 bits (the reserved high bit is dropped on receipt, §4.1).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u32);

impl StreamId {
    /// Stream 0: the connection itself.
    pub const ZERO: Self = Self(0);
    /// The largest stream identifier.
    pub const MAX: Self = Self(MASK);

    /// The identifier in the low 31 bits of `value`.
    #[must_use]
    pub const fn new(value: u32) -> Self {
        Self(value & MASK)
    }

    /// The identifier as a number.
    #[must_use]
    pub const fn value(self) -> u32 {
        self.0
    }

    /// Whether this is stream 0.
    #[must_use]
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whether a client opened it (odd identifiers, §5.1.1).
    #[must_use]
    pub const fn is_client_initiated(self) -> bool {
        self.0 % 2 == 1
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", self.0)
    }
}

impl From<u32> for StreamId {
    fn from(value: u32) -> Self {
        Self::new(value)
    }
}
