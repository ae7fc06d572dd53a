//! Checks on the fields of an HTTP/2 message (RFC 9113 §8.2, §8.3).
//!
//! A [`FieldChecker`] sees a decoded header list field by field, in order (it fits in a
//! [`crate::hpack::Sink`]), and says which pseudo-header each field is; [`FieldChecker::finish`]
//! then checks that the required ones were there. A message that fails is *malformed*: a
//! stream error of type `PROTOCOL_ERROR` (§8.1.1), which [`MalformedMessage::into_error`]
//! gives.
//!
//! The checks:
//! - names are lowercase tokens (RFC 9110 §5.1; §8.2.1 refuses uppercase, controls, spaces and
//!   colons outside the leading one of a pseudo-header; a token is stricter, and is what the
//!   proxy's HTTP/1 side could forward); values have no NUL, CR or LF, and no leading or
//!   trailing space or tab (§8.2.1), so nothing can be smuggled into an HTTP/1 head;
//! - pseudo-headers come before every regular field, appear once, and are the ones defined
//!   for the message: `:method`, `:scheme`, `:authority`, `:path` in a request, `:status` in a
//!   response, none in trailers (`:protocol` of RFC 8441 is not supported: unknown);
//! - a request has `:method`, and `:scheme` and a non-empty `:path` unless it is a CONNECT,
//!   which has `:authority` and neither of those (§8.3.1, §8.5); `:path` starts with `/`, or
//!   is `*` for OPTIONS; `:authority` has no userinfo;
//! - a response has a `:status` of three digits;
//! - connection-specific fields (`connection`, `keep-alive`, `proxy-connection`,
//!   `transfer-encoding`, `upgrade`) are refused, and `te` may only say `trailers`
//!   (§8.2.2).

use std::fmt;

use crate::error::{Error, ErrorCode};
use crate::frame::StreamId;

/// What kind of message a header list opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A request's header section.
    Request,
    /// A response's header section (final or informational).
    Response,
    /// A trailer section (a second HEADERS frame, with `END_STREAM`).
    Trailers,
}

/// A pseudo-header field (§8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pseudo {
    /// `:method`.
    Method,
    /// `:scheme`.
    Scheme,
    /// `:authority`.
    Authority,
    /// `:path`.
    Path,
    /// `:status`.
    Status,
}

impl Pseudo {
    fn parse(name: &[u8]) -> Option<Self> {
        Some(match name {
            b":method" => Self::Method,
            b":scheme" => Self::Scheme,
            b":authority" => Self::Authority,
            b":path" => Self::Path,
            b":status" => Self::Status,
            _ => return None,
        })
    }

    /// The field name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Method => ":method",
            Self::Scheme => ":scheme",
            Self::Authority => ":authority",
            Self::Path => ":path",
            Self::Status => ":status",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What a field of a valid message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A pseudo-header field.
    Pseudo(Pseudo),
    /// A regular field.
    Regular,
}

/// A connection-specific field (§8.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionField {
    /// `connection`.
    Connection,
    /// `keep-alive`.
    KeepAlive,
    /// `proxy-connection`.
    ProxyConnection,
    /// `transfer-encoding`.
    TransferEncoding,
    /// `upgrade`.
    Upgrade,
}

impl ConnectionField {
    fn parse(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"connection" => Self::Connection,
            b"keep-alive" => Self::KeepAlive,
            b"proxy-connection" => Self::ProxyConnection,
            b"transfer-encoding" => Self::TransferEncoding,
            b"upgrade" => Self::Upgrade,
            _ => return None,
        })
    }

    /// The field name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::KeepAlive => "keep-alive",
            Self::ProxyConnection => "proxy-connection",
            Self::TransferEncoding => "transfer-encoding",
            Self::Upgrade => "upgrade",
        }
    }
}

/// Why a message is malformed (RFC 9113 §8.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MalformedMessage {
    /// A field name with an uppercase letter (§8.2.1).
    UppercaseName,
    /// A field name that is empty or not a token.
    InvalidName,
    /// A field value with NUL, CR or LF, or with leading or trailing whitespace (§8.2.1).
    InvalidValue,
    /// A pseudo-header field after a regular field (§8.3).
    PseudoAfterRegular(Pseudo),
    /// A name starting with `:` that is no pseudo-header this crate knows.
    UnknownPseudo,
    /// A pseudo-header field that this kind of message does not have.
    PseudoNotAllowed(Pseudo),
    /// A pseudo-header field twice.
    DuplicatePseudo(Pseudo),
    /// A required pseudo-header field is missing.
    MissingPseudo(Pseudo),
    /// A connection-specific field (§8.2.2).
    ConnectionSpecific(ConnectionField),
    /// `te` with a value other than `trailers` (§8.2.2).
    TeNotTrailers,
    /// An empty `:path`, or one starting with neither `/` nor (for OPTIONS) `*`.
    InvalidPath,
    /// An `:authority` with userinfo, or empty.
    InvalidAuthority,
    /// A `:status` that is not three digits.
    InvalidStatus,
    /// An empty `:method` or `:scheme`.
    EmptyPseudo(Pseudo),
}

impl fmt::Display for MalformedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UppercaseName => f.write_str("header field name with an uppercase letter"),
            Self::InvalidName => f.write_str("header field name that is empty or not a token"),
            Self::InvalidValue => f.write_str(
                "header field value with NUL, CR or LF, or leading or trailing whitespace",
            ),
            Self::PseudoAfterRegular(p) => {
                write!(f, "pseudo-header field {} after a regular field", p.name())
            }
            Self::UnknownPseudo => f.write_str("unknown pseudo-header field"),
            Self::PseudoNotAllowed(p) => {
                write!(
                    f,
                    "pseudo-header field {} not allowed in this message",
                    p.name()
                )
            }
            Self::DuplicatePseudo(p) => write!(f, "pseudo-header field {} twice", p.name()),
            Self::MissingPseudo(p) => write!(f, "missing pseudo-header field {}", p.name()),
            Self::ConnectionSpecific(c) => {
                write!(f, "connection-specific header field {}", c.name())
            }
            Self::TeNotTrailers => f.write_str("te header field other than \"trailers\""),
            Self::InvalidPath => f.write_str("invalid :path"),
            Self::InvalidAuthority => f.write_str("invalid :authority"),
            Self::InvalidStatus => f.write_str(":status is not three digits"),
            Self::EmptyPseudo(p) => write!(f, "empty pseudo-header field {}", p.name()),
        }
    }
}

impl std::error::Error for MalformedMessage {}

impl MalformedMessage {
    /// The stream error a malformed message is (§8.1.1).
    #[must_use]
    pub fn into_error(self, stream_id: StreamId) -> Error {
        Error::stream(stream_id, ErrorCode::PROTOCOL_ERROR, self.reason())
    }

    /// What is wrong, without the field's name (see `Display` for that).
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Self::UppercaseName => "malformed message: uppercase header field name",
            Self::InvalidName => "malformed message: invalid header field name",
            Self::InvalidValue => "malformed message: invalid header field value",
            Self::PseudoAfterRegular(_) => "malformed message: pseudo-header after a regular field",
            Self::UnknownPseudo => "malformed message: unknown pseudo-header field",
            Self::PseudoNotAllowed(_) => "malformed message: pseudo-header field not allowed",
            Self::DuplicatePseudo(_) => "malformed message: duplicate pseudo-header field",
            Self::MissingPseudo(_) => "malformed message: missing pseudo-header field",
            Self::ConnectionSpecific(_) => "malformed message: connection-specific header field",
            Self::TeNotTrailers => "malformed message: te other than trailers",
            Self::InvalidPath => "malformed message: invalid :path",
            Self::InvalidAuthority => "malformed message: invalid :authority",
            Self::InvalidStatus => "malformed message: invalid :status",
            Self::EmptyPseudo(_) => "malformed message: empty pseudo-header field",
        }
    }
}

/// Whether each byte may appear in a field name: lowercase token characters (RFC 9110
/// §5.6.2 `tchar` without `A`-`Z`).
#[expect(
    clippy::indexing_slicing,
    reason = "compile-time evaluation: an index out of bounds fails the build, never a run"
)]
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "b < 256")]
        let c = b as u8;
        table[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// What the checks that depend on one field alone (its bytes, not its place in the message)
/// make of it: [`judge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A valid regular field.
    Regular,
    /// A pseudo-header field, with the check of its value (reported after the checks of its
    /// place, as [`FieldChecker::check`] reports them).
    Pseudo(Pseudo, Result<(), MalformedMessage>),
    /// Malformed whatever its place.
    Malformed(MalformedMessage),
}

/// Judges a field by its bytes alone (RFC 9113 §8.2, §8.3): its name and value, a
/// connection-specific name, `te`, the pseudo-header names and their values.
pub(crate) fn judge(name: &[u8], value: &[u8]) -> Verdict {
    if let Err(err) = check_value(value) {
        return Verdict::Malformed(err);
    }
    let Some(pseudo_name) = name.strip_prefix(b":") else {
        if let Err(err) = check_name(name) {
            return Verdict::Malformed(err);
        }
        if let Some(field) = ConnectionField::parse(name) {
            return Verdict::Malformed(MalformedMessage::ConnectionSpecific(field));
        }
        if name == b"te" && !value.eq_ignore_ascii_case(b"trailers") {
            return Verdict::Malformed(MalformedMessage::TeNotTrailers);
        }
        return Verdict::Regular;
    };
    if let Err(err) = check_name(pseudo_name) {
        return Verdict::Malformed(err);
    }
    let Some(pseudo) = Pseudo::parse(name) else {
        return Verdict::Malformed(MalformedMessage::UnknownPseudo);
    };
    let value_check = match pseudo {
        Pseudo::Method | Pseudo::Scheme if value.is_empty() => {
            Err(MalformedMessage::EmptyPseudo(pseudo))
        }
        Pseudo::Path if !(value.starts_with(b"/") || value == b"*") => {
            Err(MalformedMessage::InvalidPath)
        }
        Pseudo::Authority if value.is_empty() || value.contains(&b'@') => {
            Err(MalformedMessage::InvalidAuthority)
        }
        Pseudo::Status if !(value.len() == 3 && value.iter().all(u8::is_ascii_digit)) => {
            Err(MalformedMessage::InvalidStatus)
        }
        _ => Ok(()),
    };
    Verdict::Pseudo(pseudo, value_check)
}

fn check_name(name: &[u8]) -> Result<(), MalformedMessage> {
    if name.is_empty() {
        return Err(MalformedMessage::InvalidName);
    }
    // Every byte, without an early exit: the loop has no branch (names are short, and valid).
    let valid = name.iter().fold(true, |valid, &b| {
        valid & NAME_BYTES.get(usize::from(b)).copied().unwrap_or(false)
    });
    if valid {
        return Ok(());
    }
    // Named by the first byte that is not allowed.
    let first = name
        .iter()
        .find(|&&b| !NAME_BYTES.get(usize::from(b)).copied().unwrap_or(false));
    Err(if first.is_some_and(u8::is_ascii_uppercase) {
        MalformedMessage::UppercaseName
    } else {
        MalformedMessage::InvalidName
    })
}

fn check_value(value: &[u8]) -> Result<(), MalformedMessage> {
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if edge(value.first()) || edge(value.last()) || has_forbidden(value) {
        return Err(MalformedMessage::InvalidValue);
    }
    Ok(())
}

/// Whether `value` holds NUL, CR or LF: eight bytes at a time, as one word (the checks ran
/// a byte at a time at some 20 instructions per field before; every value of every head
/// passes here).
fn has_forbidden(value: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether any byte of `word` is zero (exact: a borrow only runs past a zero byte).
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS != 0;
    let has_any = |word: u64| {
        has_zero(word)
            | has_zero(word ^ u64::from_ne_bytes([b'\r'; 8]))
            | has_zero(word ^ u64::from_ne_bytes([b'\n'; 8]))
    };
    let mut chunks = value.chunks_exact(8);
    let mut found = false;
    for chunk in &mut chunks {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(chunk);
        found |= has_any(u64::from_ne_bytes(bytes));
    }
    // The tail, padded with spaces (allowed).
    let mut bytes = [b' '; 8];
    let tail = chunks.remainder();
    bytes
        .get_mut(..tail.len())
        .unwrap_or_default()
        .copy_from_slice(tail);
    found | has_any(u64::from_ne_bytes(bytes))
}

/// Checks a header list field by field (see the module documentation).
///
/// ```
/// use conduit_h2::message::{FieldChecker, FieldKind, MessageKind, Pseudo};
///
/// let mut checker = FieldChecker::new(MessageKind::Request);
/// assert_eq!(checker.check(b":method", b"GET"), Ok(FieldKind::Pseudo(Pseudo::Method)));
/// assert_eq!(checker.check(b":scheme", b"http"), Ok(FieldKind::Pseudo(Pseudo::Scheme)));
/// assert_eq!(checker.check(b":path", b"/"), Ok(FieldKind::Pseudo(Pseudo::Path)));
/// assert_eq!(checker.check(b"te", b"trailers"), Ok(FieldKind::Regular));
/// assert!(checker.check(b"Host", b"a").is_err());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FieldChecker {
    kind: MessageKind,
    /// [`Pseudo::bit`]s seen.
    seen: u8,
    regular_seen: bool,
    connect: bool,
    options: bool,
    asterisk_path: bool,
}

impl FieldChecker {
    /// A checker for a message of `kind`.
    #[must_use]
    pub fn new(kind: MessageKind) -> Self {
        Self {
            kind,
            seen: 0,
            regular_seen: false,
            connect: false,
            options: false,
            asterisk_path: false,
        }
    }

    /// Checks the next field.
    ///
    /// # Errors
    ///
    /// [`MalformedMessage`]: the message is malformed (check no further fields).
    pub fn check(&mut self, name: &[u8], value: &[u8]) -> Result<FieldKind, MalformedMessage> {
        self.check_judged(judge(name, value), value)
    }

    /// Checks the next field, `value` with what [`judge`] made of it (remembered with a
    /// decoder's table entry, so a field indexed again is not judged again): the checks that
    /// depend on the fields before it.
    pub(crate) fn check_judged(
        &mut self,
        verdict: Verdict,
        value: &[u8],
    ) -> Result<FieldKind, MalformedMessage> {
        let (pseudo, value_check) = match verdict {
            Verdict::Regular => {
                self.regular_seen = true;
                return Ok(FieldKind::Regular);
            }
            Verdict::Malformed(err) => return Err(err),
            Verdict::Pseudo(pseudo, value_check) => (pseudo, value_check),
        };
        if self.regular_seen {
            return Err(MalformedMessage::PseudoAfterRegular(pseudo));
        }
        let allowed = match self.kind {
            MessageKind::Request => pseudo != Pseudo::Status,
            MessageKind::Response => pseudo == Pseudo::Status,
            MessageKind::Trailers => false,
        };
        if !allowed {
            return Err(MalformedMessage::PseudoNotAllowed(pseudo));
        }
        if self.seen & pseudo.bit() != 0 {
            return Err(MalformedMessage::DuplicatePseudo(pseudo));
        }
        self.seen |= pseudo.bit();
        value_check?;
        match pseudo {
            Pseudo::Method => {
                self.connect = value == b"CONNECT";
                self.options = value == b"OPTIONS";
            }
            Pseudo::Path => self.asterisk_path = value == b"*",
            Pseudo::Authority | Pseudo::Scheme | Pseudo::Status => {}
        }
        Ok(FieldKind::Pseudo(pseudo))
    }

    fn has(&self, pseudo: Pseudo) -> bool {
        self.seen & pseudo.bit() != 0
    }

    /// Checks that the message had the pseudo-headers it requires, once all fields were
    /// checked.
    ///
    /// # Errors
    ///
    /// [`MalformedMessage`].
    pub fn finish(&self) -> Result<(), MalformedMessage> {
        match self.kind {
            MessageKind::Request => {
                if !self.has(Pseudo::Method) {
                    return Err(MalformedMessage::MissingPseudo(Pseudo::Method));
                }
                if self.connect {
                    // §8.5: only `:method` and `:authority`.
                    for pseudo in [Pseudo::Scheme, Pseudo::Path] {
                        if self.has(pseudo) {
                            return Err(MalformedMessage::PseudoNotAllowed(pseudo));
                        }
                    }
                    if !self.has(Pseudo::Authority) {
                        return Err(MalformedMessage::MissingPseudo(Pseudo::Authority));
                    }
                    return Ok(());
                }
                for pseudo in [Pseudo::Scheme, Pseudo::Path] {
                    if !self.has(pseudo) {
                        return Err(MalformedMessage::MissingPseudo(pseudo));
                    }
                }
                if self.asterisk_path && !self.options {
                    return Err(MalformedMessage::InvalidPath);
                }
                Ok(())
            }
            MessageKind::Response => {
                if self.has(Pseudo::Status) {
                    Ok(())
                } else {
                    Err(MalformedMessage::MissingPseudo(Pseudo::Status))
                }
            }
            MessageKind::Trailers => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The word-at-a-time scan finds NUL, CR and LF wherever they are, and nothing else.
        #[test]
        fn forbidden_bytes_are_found_anywhere(value in proptest::collection::vec(any::<u8>(), 0..40)) {
            let expected = value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n');
            prop_assert_eq!(has_forbidden(&value), expected);
        }

        #[test]
        fn one_forbidden_byte_in_clean_text_is_found(len in 1usize..40, at in 0usize..40, pick in 0usize..3) {
            let mut value = vec![b'a'; len];
            let at = at % len;
            value[at] = [0, b'\r', b'\n'][pick];
            prop_assert!(has_forbidden(&value));
            // Neighbours of the forbidden bytes are not mistaken for them.
            value[at] = [1, b'\r' + 1, b'\n' - 1][pick];
            prop_assert!(!has_forbidden(&value));
        }
    }

    fn check(kind: MessageKind, fields: &[(&str, &str)]) -> Result<(), MalformedMessage> {
        let mut checker = FieldChecker::new(kind);
        for (name, value) in fields {
            checker.check(name.as_bytes(), value.as_bytes())?;
        }
        checker.finish()
    }

    fn request(fields: &[(&str, &str)]) -> Result<(), MalformedMessage> {
        check(MessageKind::Request, fields)
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "web:8080"),
        (":path", "/a?b"),
    ];

    #[test]
    fn valid_messages() {
        assert_eq!(request(&GET), Ok(()));
        let mut with_fields = GET.to_vec();
        with_fields.extend([("te", "trailers"), ("x-a", ""), ("grpc-timeout", "1S")]);
        assert_eq!(request(&with_fields), Ok(()));
        assert_eq!(
            request(&[(":method", "CONNECT"), (":authority", "db:5432")]),
            Ok(())
        );
        assert_eq!(
            request(&[(":method", "OPTIONS"), (":scheme", "http"), (":path", "*")]),
            Ok(())
        );
        assert_eq!(
            check(
                MessageKind::Response,
                &[(":status", "200"), ("grpc-status", "0")]
            ),
            Ok(())
        );
        assert_eq!(
            check(MessageKind::Trailers, &[("grpc-status", "0")]),
            Ok(())
        );
    }

    #[test]
    fn pseudo_header_rules() {
        use MalformedMessage::*;
        let cases: &[(&[(&str, &str)], MalformedMessage)] = &[
            (
                &[(":method", "GET"), ("x", "1"), (":path", "/")],
                PseudoAfterRegular(Pseudo::Path),
            ),
            (
                &[(":method", "GET"), (":protocol", "websocket")],
                UnknownPseudo,
            ),
            (
                &[(":method", "GET"), (":status", "200")],
                PseudoNotAllowed(Pseudo::Status),
            ),
            (
                &[(":method", "GET"), (":method", "GET")],
                DuplicatePseudo(Pseudo::Method),
            ),
            (
                &[(":scheme", "http"), (":path", "/")],
                MissingPseudo(Pseudo::Method),
            ),
            (
                &[(":method", "GET"), (":path", "/")],
                MissingPseudo(Pseudo::Scheme),
            ),
            (
                &[(":method", "GET"), (":scheme", "http")],
                MissingPseudo(Pseudo::Path),
            ),
            (
                &[(":method", "GET"), (":scheme", "http"), (":path", "")],
                InvalidPath,
            ),
            (
                &[(":method", "GET"), (":scheme", "http"), (":path", "a")],
                InvalidPath,
            ),
            (
                &[(":method", "GET"), (":scheme", "http"), (":path", "*")],
                InvalidPath,
            ),
            (
                &[(":method", ""), (":scheme", "http"), (":path", "/")],
                EmptyPseudo(Pseudo::Method),
            ),
            (
                &[(":method", "GET"), (":authority", "u@h")],
                InvalidAuthority,
            ),
            (
                &[
                    (":method", "CONNECT"),
                    (":authority", "h:1"),
                    (":path", "/"),
                ],
                PseudoNotAllowed(Pseudo::Path),
            ),
            (&[(":method", "CONNECT")], MissingPseudo(Pseudo::Authority)),
        ];
        for (fields, error) in cases {
            assert_eq!(request(fields), Err(*error), "{fields:?}");
        }
        assert_eq!(
            check(MessageKind::Response, &[(":status", "20")]),
            Err(InvalidStatus)
        );
        assert_eq!(
            check(MessageKind::Response, &[("x", "1")]),
            Err(MissingPseudo(Pseudo::Status))
        );
        assert_eq!(
            check(MessageKind::Response, &[(":status", "200"), (":path", "/")]),
            Err(PseudoNotAllowed(Pseudo::Path))
        );
        assert_eq!(
            check(MessageKind::Trailers, &[(":status", "200")]),
            Err(PseudoNotAllowed(Pseudo::Status))
        );
    }

    #[test]
    fn field_rules() {
        use MalformedMessage::*;
        let with = |name: &'static str, value: &'static str| {
            let mut fields = GET.to_vec();
            fields.push((name, value));
            request(&fields)
        };
        assert_eq!(with("Host", "a"), Err(UppercaseName));
        assert_eq!(with("x y", "a"), Err(InvalidName));
        assert_eq!(with("x:y", "a"), Err(InvalidName));
        assert_eq!(with("", "a"), Err(InvalidName));
        assert_eq!(with("x", "a\r\nb: c"), Err(InvalidValue));
        assert_eq!(with("x", "a\0"), Err(InvalidValue));
        assert_eq!(with("x", " a"), Err(InvalidValue));
        assert_eq!(with("x", "a\t"), Err(InvalidValue));
        assert_eq!(with("x", "a b"), Ok(()));
        assert_eq!(
            with("connection", "close"),
            Err(ConnectionSpecific(ConnectionField::Connection))
        );
        assert_eq!(
            with("keep-alive", "5"),
            Err(ConnectionSpecific(ConnectionField::KeepAlive))
        );
        assert_eq!(
            with("transfer-encoding", "chunked"),
            Err(ConnectionSpecific(ConnectionField::TransferEncoding))
        );
        assert_eq!(
            with("upgrade", "h2c"),
            Err(ConnectionSpecific(ConnectionField::Upgrade))
        );
        assert_eq!(
            with("proxy-connection", "x"),
            Err(ConnectionSpecific(ConnectionField::ProxyConnection))
        );
        assert_eq!(with("te", "gzip"), Err(TeNotTrailers));
        assert_eq!(with("te", "trailers, gzip"), Err(TeNotTrailers));
        let mut bad_pseudo = GET.to_vec();
        bad_pseudo.insert(0, (":Path", "/"));
        assert_eq!(request(&bad_pseudo), Err(UppercaseName));
        assert_eq!(
            DuplicatePseudo(Pseudo::Path).to_string(),
            "pseudo-header field :path twice"
        );
        let error = TeNotTrailers.into_error(StreamId::new(1));
        assert_eq!(
            (error.code(), error.is_connection_error()),
            (ErrorCode::PROTOCOL_ERROR, false)
        );
    }
}
