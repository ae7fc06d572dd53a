//! Bootstrap tokens: how a workload on a host proves its identity to the CA.
//!
//! A token is `ct1:<identity>:<hex HMAC-SHA256(key, "conduit-identity-token-v1\0" + identity)>`,
//! where the key is the identity directory's [`TOKEN_KEY_FILE`]. The
//! identity is read from the token, and the MAC is checked in constant time
//! (`ring::hmac::verify`). Whoever holds a token can be that identity, so hand it to the
//! workload as a secret. Tokens do not expire; changing the key revokes them all.

use core::fmt;
use std::path::{Path, PathBuf};

use ring::hmac;

use super::files::{self, ReadError};
use super::{TOKEN_KEY_FILE, check_identity, truncated};

/// The token format's prefix (its version).
pub const TOKEN_PREFIX: &str = "ct1:";

/// What the MAC covers before the identity: the format's name and version, so a MAC made with
/// this key for any other purpose can never pass as a token.
const MAC_CONTEXT: &[u8] = b"conduit-identity-token-v1\0";

/// Bytes in the token key.
pub const TOKEN_KEY_BYTES: usize = 32;

/// The longest token accepted: the prefix, the longest identity, `:` and 64 hex digits.
pub const MAX_TOKEN_BYTES: usize = TOKEN_PREFIX.len() + super::MAX_IDENTITY_BYTES + 1 + 64;

/// Why a token could not be issued or was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not of the form `ct1:<identity>:<64 hex digits>`.
    #[error("malformed token: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The token is well-formed but its MAC is not this CA's.
    #[error("the token was not issued by this controller (or its key has changed)")]
    NotIssuedHere,
    /// The identity asked for is not a valid name.
    #[error("invalid identity `{identity}`: {reason}")]
    InvalidIdentity {
        /// The identity (truncated).
        identity: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The directory has no token key.
    #[error(
        "{} does not exist: start the controller with this identity directory first (it creates the key)",
        path.display()
    )]
    NoKey {
        /// The missing file.
        path: PathBuf,
    },
    /// The token key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The token key file holds something other than 32 bytes in hex.
    #[error("{}: {reason}", path.display())]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The HMAC key tokens are made and checked with. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey([secret])")
    }
}

impl TokenKey {
    /// A key from its 32 bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; TOKEN_KEY_BYTES]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Reads the key file of the identity directory `dir`.
    ///
    /// # Errors
    ///
    /// [`TokenError::NoKey`], [`TokenError::Read`] or [`TokenError::InvalidKey`], naming the
    /// file.
    pub fn load(dir: &Path) -> Result<Self, TokenError> {
        let path = dir.join(TOKEN_KEY_FILE);
        let contents = match files::read(&path) {
            Ok(contents) => contents,
            Err(ReadError::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenError::NoKey { path });
            }
            Err(ReadError::Io(source)) => return Err(TokenError::Read { path, source }),
            Err(ReadError::TooLarge) => {
                return Err(TokenError::InvalidKey {
                    path,
                    reason: "far too large for a key of 64 hex digits",
                });
            }
        };
        Self::parse(&contents).map_err(|reason| TokenError::InvalidKey { path, reason })
    }

    /// Parses the key file's contents: 64 hex digits, optionally surrounded by whitespace.
    fn parse(contents: &[u8]) -> Result<Self, &'static str> {
        let text = contents.trim_ascii();
        let mut bytes = [0u8; TOKEN_KEY_BYTES];
        if text.len() != TOKEN_KEY_BYTES * 2 {
            return Err("not a key of 64 hex digits");
        }
        if !decode_hex(text, &mut bytes) {
            return Err("not a key of 64 hex digits (found a non-hex character)");
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// The file contents for `bytes`: 64 lower-case hex digits and a newline.
    pub(super) fn file_contents(bytes: &[u8; TOKEN_KEY_BYTES]) -> String {
        let mut text = hex(bytes);
        text.push('\n');
        text
    }

    /// The token for `identity`.
    ///
    /// # Errors
    ///
    /// [`TokenError::InvalidIdentity`] when `identity` is not a valid name.
    pub fn issue(&self, identity: &str) -> Result<String, TokenError> {
        check_identity(identity).map_err(|reason| TokenError::InvalidIdentity {
            identity: truncated(identity),
            reason,
        })?;
        let tag = hmac::sign(&self.key, &message(identity));
        Ok(format!("{TOKEN_PREFIX}{identity}:{}", hex(tag.as_ref())))
    }

    /// Checks `token` and returns the identity it proves.
    ///
    /// # Errors
    ///
    /// [`TokenError::Malformed`], [`TokenError::InvalidIdentity`] or
    /// [`TokenError::NotIssuedHere`].
    pub fn verify(&self, token: &[u8]) -> Result<String, TokenError> {
        let malformed = |reason| TokenError::Malformed { reason };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("longer than any token"));
        }
        let token = core::str::from_utf8(token).map_err(|_| malformed("not UTF-8 text"))?;
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| malformed("it does not start with `ct1:`"))?;
        let (identity, mac_hex) = rest
            .rsplit_once(':')
            .ok_or_else(|| malformed("no `:` between the identity and the MAC"))?;
        check_identity(identity).map_err(|reason| TokenError::InvalidIdentity {
            identity: truncated(identity),
            reason,
        })?;
        let mut mac = [0u8; 32];
        if mac_hex.len() != 64 || !decode_hex(mac_hex.as_bytes(), &mut mac) {
            return Err(malformed("the MAC is not 64 hex digits"));
        }
        hmac::verify(&self.key, &message(identity), &mac).map_err(|_| TokenError::NotIssuedHere)?;
        Ok(identity.to_owned())
    }
}

/// Issues the bootstrap token for `identity` with the key in the identity directory `dir`
/// (which a controller has already created).
///
/// # Errors
///
/// [`TokenError::NoKey`] when `dir` has no token key yet, [`TokenError::Read`] or
/// [`TokenError::InvalidKey`] naming the file, and [`TokenError::InvalidIdentity`].
pub fn issue_token(dir: &Path, identity: &str) -> Result<String, TokenError> {
    // The name first: a typo in it is the likelier mistake, and needs no directory.
    check_identity(identity).map_err(|reason| TokenError::InvalidIdentity {
        identity: truncated(identity),
        reason,
    })?;
    TokenKey::load(dir)?.issue(identity)
}

fn message(identity: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(MAC_CONTEXT.len() + identity.len());
    message.extend_from_slice(MAC_CONTEXT);
    message.extend_from_slice(identity.as_bytes());
    message
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

/// Decodes hex digits (either case) into `out`, which must be exactly half as long.
fn decode_hex(text: &[u8], out: &mut [u8]) -> bool {
    if text.len() != out.len() * 2 {
        return false;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (pair, byte) in text.chunks_exact(2).zip(out.iter_mut()) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(high), Some(low)) => *byte = (high << 4) | low,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(fill: u8) -> TokenKey {
        TokenKey::from_bytes(&[fill; TOKEN_KEY_BYTES])
    }

    #[test]
    fn a_token_proves_its_identity_and_only_with_its_key() {
        let token = key(1).issue("web.default.identity.conduit.local").unwrap();
        assert!(token.starts_with("ct1:web.default.identity.conduit.local:"));
        assert_eq!(token.len(), 4 + 34 + 1 + 64);
        assert_eq!(
            key(1).verify(token.as_bytes()).unwrap(),
            "web.default.identity.conduit.local"
        );
        assert!(matches!(
            key(2).verify(token.as_bytes()),
            Err(TokenError::NotIssuedHere)
        ));
    }

    #[test]
    fn an_edited_identity_is_refused() {
        let token = key(1).issue("web.default").unwrap();
        let forged = token.replace("web.default", "api.default");
        assert!(matches!(
            key(1).verify(forged.as_bytes()),
            Err(TokenError::NotIssuedHere)
        ));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        for (token, want) in [
            ("", "ct1:"),
            ("ct2:web:00", "ct1:"),
            ("ct1:web", "no `:`"),
            ("ct1:web:xyz", "64 hex digits"),
        ] {
            let err = key(1).verify(token.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{token:?}: {err}");
        }
        let err = key(1).verify(b"ct1:Web:00").unwrap_err();
        assert!(matches!(err, TokenError::InvalidIdentity { .. }), "{err:?}");
    }

    #[test]
    fn key_files_are_hex_and_checked() {
        let bytes = [0xab; TOKEN_KEY_BYTES];
        let contents = TokenKey::file_contents(&bytes);
        let parsed = TokenKey::parse(contents.as_bytes()).unwrap();
        let token = parsed.issue("a").unwrap();
        assert!(
            TokenKey::from_bytes(&bytes)
                .verify(token.as_bytes())
                .is_ok()
        );
        assert!(TokenKey::parse(b"abc").is_err());
        assert!(TokenKey::parse(&[b'g'; 64]).is_err());
        assert!(format!("{parsed:?}").contains("secret"));
    }

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = key(1).verify(&bytes);
        }

        #[test]
        fn arbitrary_text_tokens_never_panic(text in "ct1:[a-z0-9.:-]{0,80}") {
            let _ = key(1).verify(text.as_bytes());
        }
    }
}
