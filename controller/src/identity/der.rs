//! Just enough DER to read three fields of an X.509 certificate: its validity's end, its
//! subject public key info, and (for messages) nothing else.
//!
//! rcgen reads CSRs for us but, in 0.14, exposes no parser for certificates' validity, and
//! webpki checks chains without reporting dates. The expiry metrics and the issuer's key check
//! need these two fields, so this walks the certificate's outer structure (RFC 5280 §4.1):
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
//! TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
//!                               validity SEQUENCE { notBefore Time, notAfter Time },
//!                               subject, subjectPublicKeyInfo, ... }
//! ```
//!
//! Every read is bounds-checked; garbage is an error, never a panic. Whether a certificate is
//! *valid* (signatures, constraints, dates against now) is webpki's job, not this module's.

use conduit_core::time::UnixTime;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The fields of a certificate this module reads.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CertFields<'a> {
    /// The start of the validity period.
    pub(super) not_before: UnixTime,
    /// The end of the validity period.
    pub(super) not_after: UnixTime,
    /// The whole SubjectPublicKeyInfo element (tag and length included).
    pub(super) spki: &'a [u8],
}

/// One element: its tag, its contents, the whole encoding, and what follows it.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    whole: &'a [u8],
    rest: &'a [u8],
}

fn element(input: &[u8]) -> Result<Element<'_>, &'static str> {
    let (&tag, after_tag) = input.split_first().ok_or("truncated")?;
    let (&first, after_len) = after_tag.split_first().ok_or("truncated")?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err("unsupported length encoding");
        }
        let bytes = after_len.get(..count).ok_or("truncated")?;
        let len = bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, 2 + count)
    };
    let end = header.checked_add(len).ok_or("length overflows")?;
    let whole = input.get(..end).ok_or("truncated")?;
    Ok(Element {
        tag,
        contents: &whole[header..],
        whole,
        rest: &input[end..],
    })
}

fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<Element<'a>, &'static str> {
    let element = element(input)?;
    if element.tag == tag {
        Ok(element)
    } else {
        Err(what)
    }
}

/// Reads a certificate's validity end and public key.
///
/// # Errors
///
/// What is malformed, for a message.
pub(super) fn read_certificate(der: &[u8]) -> Result<CertFields<'_>, &'static str> {
    let certificate = expect(der, SEQUENCE, "not a certificate (no outer SEQUENCE)")?;
    if !certificate.rest.is_empty() {
        return Err("trailing bytes after the certificate");
    }
    let tbs = expect(certificate.contents, SEQUENCE, "no tbsCertificate")?;
    let mut fields = tbs.contents;
    if fields.first() == Some(&VERSION) {
        fields = element(fields)?.rest;
    }
    fields = expect(fields, INTEGER, "no serial number")?.rest;
    fields = expect(fields, SEQUENCE, "no signature algorithm")?.rest;
    fields = expect(fields, SEQUENCE, "no issuer name")?.rest;
    let validity = expect(fields, SEQUENCE, "no validity")?;
    let not_before = element(validity.contents)?;
    let not_after = element(not_before.rest)?;
    let not_before = time(not_before.tag, not_before.contents)?;
    let not_after = time(not_after.tag, not_after.contents)?;
    fields = expect(validity.rest, SEQUENCE, "no subject name")?.rest;
    let spki = expect(fields, SEQUENCE, "no subject public key info")?;
    Ok(CertFields {
        not_before,
        not_after,
        spki: spki.whole,
    })
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as RFC 5280 §4.1.2.5
/// requires them: UTC, whole seconds.
fn time(tag: u8, text: &[u8]) -> Result<UnixTime, &'static str> {
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 13 => {
            let yy = i32::from(two_digits(text, 0)?);
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 15 => {
            let year = i32::from(two_digits(text, 0)?) * 100 + i32::from(two_digits(text, 2)?);
            (year, &text[4..])
        }
        _ => return Err("validity time is not a UTCTime or GeneralizedTime of RFC 5280's form"),
    };
    if rest.last() != Some(&b'Z') {
        return Err("validity time is not in UTC");
    }
    let month = time::Month::try_from(two_digits(rest, 0)?).map_err(|_| "invalid month")?;
    let date = time::Date::from_calendar_date(year, month, two_digits(rest, 2)?)
        .map_err(|_| "invalid date")?;
    let clock = time::Time::from_hms(
        two_digits(rest, 4)?,
        two_digits(rest, 6)?,
        two_digits(rest, 8)?,
    )
    .map_err(|_| "invalid time of day")?;
    let secs = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp();
    // Before 1970 counts as 1970: such a certificate has long expired either way.
    Ok(UnixTime::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn two_digits(text: &[u8], at: usize) -> Result<u8, &'static str> {
    match text.get(at..at + 2) {
        Some(&[a, b]) if a.is_ascii_digit() && b.is_ascii_digit() => {
            Ok((a - b'0') * 10 + (b - b'0'))
        }
        _ => Err("validity time holds a non-digit"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn times_in_both_forms() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Ok(UnixTime::from_secs(0)));
        assert_eq!(
            time(UTC_TIME, b"491231235959Z"),
            Ok(UnixTime::from_secs(2_524_607_999))
        );
        assert_eq!(
            time(GENERALIZED_TIME, b"20500101000000Z"),
            Ok(UnixTime::from_secs(2_524_608_000))
        );
        assert!(time(UTC_TIME, b"701301000000Z").is_err());
        assert!(time(UTC_TIME, b"70010100000+Z").is_err());
        assert!(time(GENERALIZED_TIME, b"20500101000000+0100").is_err());
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_certificate(&bytes);
        }

        #[test]
        fn garbage_inside_a_sequence_is_an_error_not_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut der = vec![SEQUENCE, u8::try_from(bytes.len()).unwrap_or(0)];
            der.extend_from_slice(&bytes);
            let _ = read_certificate(&der);
        }
    }
}
