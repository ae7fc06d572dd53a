//! HTTP/2 error codes and the connection-or-stream errors the codec reports (RFC 9113 §5.4,
//! §7).

use std::fmt;

use crate::id::StreamId;

/// An HTTP/2 error code (RFC 9113 §7), as carried by `RST_STREAM` and `GOAWAY`.
///
/// A newtype rather than an enum: a peer may send codes this crate does not know, and those
/// must be carried, not refused ("Unknown or unsupported error codes MUST NOT trigger any
/// special behavior").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Graceful shutdown, or no error.
    pub const NO_ERROR: Self = Self(0x0);
    /// An unspecific protocol error.
    pub const PROTOCOL_ERROR: Self = Self(0x1);
    /// The endpoint failed on its own.
    pub const INTERNAL_ERROR: Self = Self(0x2);
    /// The peer broke flow control.
    pub const FLOW_CONTROL_ERROR: Self = Self(0x3);
    /// A SETTINGS frame was not acknowledged in time.
    pub const SETTINGS_TIMEOUT: Self = Self(0x4);
    /// A frame arrived on a half-closed stream.
    pub const STREAM_CLOSED: Self = Self(0x5);
    /// A frame had an invalid size.
    pub const FRAME_SIZE_ERROR: Self = Self(0x6);
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: Self = Self(0x7);
    /// The stream is no longer needed.
    pub const CANCEL: Self = Self(0x8);
    /// The HPACK state cannot be kept in step (RFC 7541).
    pub const COMPRESSION_ERROR: Self = Self(0x9);
    /// A CONNECT tunnel failed.
    pub const CONNECT_ERROR: Self = Self(0xa);
    /// The peer is behaving in a way that generates excessive load.
    pub const ENHANCE_YOUR_CALM: Self = Self(0xb);
    /// The transport does not meet the security requirements.
    pub const INADEQUATE_SECURITY: Self = Self(0xc);
    /// The peer should use HTTP/1.1 for this request.
    pub const HTTP_1_1_REQUIRED: Self = Self(0xd);

    /// The RFC's name of a known code.
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => return None,
        })
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown error code {:#x}", self.0),
        }
    }
}

/// A protocol error found in what the peer sent, with the scope the RFC gives it.
///
/// A connection error ends the connection (`GOAWAY` with `code`, RFC 9113 §5.4.1); a stream
/// error resets one stream (`RST_STREAM` with `code`, §5.4.2) and the connection goes on. An
/// endpoint may always treat a stream error as a connection error; never the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The whole connection is unusable: send `GOAWAY` and close.
    Connection {
        /// The code to send in `GOAWAY`.
        code: ErrorCode,
        /// What was wrong, for logs.
        reason: &'static str,
    },
    /// One stream is unusable: send `RST_STREAM`; the connection stays up.
    Stream {
        /// The stream to reset.
        stream_id: StreamId,
        /// The code to send in `RST_STREAM`.
        code: ErrorCode,
        /// What was wrong, for logs.
        reason: &'static str,
    },
}

impl Error {
    /// A connection error.
    #[must_use]
    pub const fn connection(code: ErrorCode, reason: &'static str) -> Self {
        Self::Connection { code, reason }
    }

    /// A stream error.
    #[must_use]
    pub const fn stream(stream_id: StreamId, code: ErrorCode, reason: &'static str) -> Self {
        Self::Stream {
            stream_id,
            code,
            reason,
        }
    }

    /// The error code to send.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match *self {
            Self::Connection { code, .. } | Self::Stream { code, .. } => code,
        }
    }

    /// What was wrong.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match *self {
            Self::Connection { reason, .. } | Self::Stream { reason, .. } => reason,
        }
    }

    /// Whether the whole connection must end.
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Self::Connection { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connection { code, reason } => write!(f, "connection error {code}: {reason}"),
            Self::Stream {
                stream_id,
                code,
                reason,
            } => write!(
                f,
                "stream error {code} on stream {}: {reason}",
                stream_id.value()
            ),
        }
    }
}

impl std::error::Error for Error {}
