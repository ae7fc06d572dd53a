#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conduit_core::time::UnixTime;
use proptest::prelude::*;
use rcgen::{CertificateParams, KeyPair};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;

use conduit_proto::crypto::{Crypto, KeyKind};

use super::*;

/// 2023-11-14T22:13:20Z: every test's "now".
const T0: u64 = 1_700_000_000;

const WEB: &str = "web.default.identity.conduit.local";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conduit-identity-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A wall clock the test moves.
fn clock() -> (WallClock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(T0));
    let reading = Arc::clone(&now);
    let clock: WallClock = Arc::new(move || UnixTime::from_secs(reading.load(Ordering::Relaxed)));
    (clock, now)
}

fn open(dir: &Path) -> CertificateAuthority {
    CertificateAuthority::open(
        &IdentityConfig::new(dir.to_owned()),
        fixed_wall_clock(UnixTime::from_secs(T0)),
    )
    .unwrap()
}

/// A CSR for `names` (DNS SANs), and its key.
fn csr(names: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn verifier_for(
    anchors: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Arc<WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor).unwrap();
    }
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

/// Whether webpki accepts `certified` as a server certificate for `name` at `at`.
fn verifies(
    ca: &CertificateAuthority,
    certified: &Certified,
    name: &str,
    at: u64,
) -> Result<(), rustls::Error> {
    verify_against(ca.trust_anchors(), certified, name, at)
}

/// Whether webpki accepts `certified` as a server certificate for `name` at `at` against
/// exactly `anchors`.
fn verify_against(
    anchors: Vec<rustls::pki_types::CertificateDer<'static>>,
    certified: &Certified,
    name: &str,
    at: u64,
) -> Result<(), rustls::Error> {
    verifier_for(anchors)
        .verify_server_cert(
            &certified.leaf,
            &certified.intermediates,
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at)),
        )
        .map(|_| ())
}

/// An in-memory CA at [`T0`] making keys of kind `keys` (the simulation's is Ed25519).
fn memory_ca(keys: KeyKind) -> CertificateAuthority {
    let crypto = Crypto {
        keys,
        ..Crypto::system()
    };
    CertificateAuthority::in_memory(
        DEFAULT_LEAF_LIFETIME,
        fixed_wall_clock(UnixTime::from_secs(T0)),
        crypto,
    )
    .unwrap()
}

fn certify(ca: &CertificateAuthority, identity: &str) -> Certified {
    let token = ca.issue_token(identity).unwrap();
    ca.certify(identity, token.as_bytes(), &csr(&[identity]))
        .unwrap()
}

#[cfg(unix)]
#[test]
fn bootstrap_writes_the_files_with_their_modes_and_a_restart_reuses_them() {
    let dir = temp_dir("bootstrap");
    let ca = open(&dir);
    let mode = |name: &str| files::mode(&dir.join(name)).unwrap();
    assert_eq!(files::mode(&dir).unwrap(), 0o700);
    for key in [ANCHOR_KEY_FILE, ISSUER_KEY_FILE, TOKEN_KEY_FILE] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    for cert in [TRUST_ANCHORS_FILE, ISSUER_CERT_FILE] {
        assert_eq!(mode(cert), 0o644, "{cert}");
    }
    assert_eq!(
        ca.trust_anchors_pem(),
        std::fs::read(dir.join(TRUST_ANCHORS_FILE)).unwrap()
    );
    assert_eq!(
        ca.trust_anchors_not_after(),
        UnixTime::from_secs(T0 + CA_VALIDITY.as_secs())
    );
    assert_eq!(
        ca.issuer_not_after(),
        UnixTime::from_secs(T0 + CA_VALIDITY.as_secs())
    );
    let token = issue_token(&dir, WEB).unwrap();

    let again = open(&dir);
    assert_eq!(again.trust_anchors(), ca.trust_anchors());
    assert_eq!(again.issuer_certificate(), ca.issuer_certificate());
    // The token key was kept too: a token issued before the restart still works.
    assert!(again.certify(WEB, token.as_bytes(), &csr(&[WEB])).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_issuer_is_signed_again_by_the_anchor() {
    let dir = temp_dir("missing-issuer");
    let ca = open(&dir);
    std::fs::remove_file(dir.join(ISSUER_CERT_FILE)).unwrap();
    let again = open(&dir);
    assert_eq!(again.trust_anchors(), ca.trust_anchors());
    assert_ne!(again.issuer_certificate(), ca.issuer_certificate());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_leaf_verifies_for_its_identity_inside_its_validity_only() {
    let dir = temp_dir("leaf");
    let ca = open(&dir);
    let certified = certify(&ca, WEB);
    assert_eq!(certified.intermediates, [ca.issuer_certificate()]);
    assert_eq!(
        certified.valid_until,
        UnixTime::from_secs(T0 + DEFAULT_LEAF_LIFETIME.as_secs())
    );
    verifies(&ca, &certified, WEB, T0).unwrap();
    verifies(&ca, &certified, WEB, T0 + 3600).unwrap();
    let err = verifies(&ca, &certified, WEB, T0 + 25 * 3600).unwrap_err();
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    let err = verifies(&ca, &certified, "api.default.identity.conduit.local", T0).unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");

    // The same leaf authenticates a client (the other side of mTLS).
    let mut roots = rustls::RootCertStore::empty();
    for anchor in ca.trust_anchors() {
        roots.add(anchor.clone()).unwrap();
    }
    let clients = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    clients
        .verify_client_cert(
            &certified.leaf,
            &certified.intermediates,
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(T0)),
        )
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_leaf_lifetime_and_the_clock_skew_allowance_are_honoured() {
    let (clock, now) = clock();
    let config = IdentityConfig {
        leaf_lifetime: Duration::from_secs(3600),
        ..IdentityConfig::new(temp_dir("lifetime"))
    };
    let ca = CertificateAuthority::open(&config, clock).unwrap();
    now.store(T0 + 1000, Ordering::Relaxed);
    let certified = certify(&ca, WEB);
    let issued = T0 + 1000;
    assert_eq!(certified.valid_until, UnixTime::from_secs(issued + 3600));
    assert_eq!(
        der::read_certificate(&certified.leaf).unwrap().not_after,
        UnixTime::from_secs(issued + 3600)
    );
    // Valid from 20 s before it was signed, to its end, and not a second outside.
    verifies(&ca, &certified, WEB, issued - 20).unwrap();
    verifies(&ca, &certified, WEB, issued + 3600).unwrap();
    let early = verifies(&ca, &certified, WEB, issued - 21).unwrap_err();
    assert!(format!("{early:?}").contains("NotValidYet"), "{early:?}");
    let late = verifies(&ca, &certified, WEB, issued + 3601).unwrap_err();
    assert!(format!("{late:?}").contains("Expired"), "{late:?}");
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn a_leaf_never_outlives_its_issuer() {
    let (clock, now) = clock();
    let ca =
        CertificateAuthority::in_memory(DEFAULT_LEAF_LIFETIME, clock, Crypto::system()).unwrap();
    let issuer_end = ca.issuer_not_after().as_secs();
    now.store(issuer_end - 60, Ordering::Relaxed);
    assert_eq!(
        certify(&ca, WEB).valid_until,
        UnixTime::from_secs(issuer_end)
    );
}

#[test]
fn an_in_memory_ca_rotates_its_issuer_and_old_leaves_stay_valid() {
    // Ed25519 keys throughout, as the simulation makes them.
    let ca = memory_ca(KeyKind::Ed25519);
    let before = certify(&ca, WEB);
    let old_issuer = ca.issuer_certificate();
    ca.rotate_issuer_in_memory().unwrap();
    assert_ne!(ca.issuer_certificate(), old_issuer);
    let after = certify(&ca, WEB);
    assert_eq!(after.intermediates, vec![ca.issuer_certificate()]);
    for certified in [&before, &after] {
        verifies(&ca, certified, WEB, T0 + 60).unwrap();
    }
    // A directory's CA rotates through its files, not in memory.
    let dir = temp_dir("rotate-in-memory");
    let err = open(&dir).rotate_issuer_in_memory().unwrap_err();
    assert!(err.to_string().contains("rotate-issuer"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refusals_say_why() {
    let ca = memory_ca(KeyKind::EcdsaP256);
    let other = memory_ca(KeyKind::EcdsaP256);
    let token = ca.issue_token(WEB).unwrap();
    let good_csr = csr(&[WEB]);

    // Bad tokens: none, garbled, another CA's.
    for bad in [
        Vec::new(),
        b"ct1:web:zz".to_vec(),
        other.issue_token(WEB).unwrap().into_bytes(),
    ] {
        let err = ca.certify(WEB, &bad, &good_csr).unwrap_err();
        assert!(matches!(err, CertifyError::Unauthenticated(_)), "{err:?}");
        assert_eq!(
            err.outcome(),
            crate::metrics::CertifyOutcome::Unauthenticated
        );
    }

    // A good token, used for another identity.
    let err = ca
        .certify(
            "api.default.identity.conduit.local",
            token.as_bytes(),
            &good_csr,
        )
        .unwrap_err();
    assert!(
        matches!(err, CertifyError::IdentityMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(WEB), "{err}");

    // A CSR asking for another name, or for an extra one.
    for names in [
        &["api.default.identity.conduit.local"][..],
        &[WEB, "api.default.identity.conduit.local"],
    ] {
        let err = ca.certify(WEB, token.as_bytes(), &csr(names)).unwrap_err();
        assert!(matches!(err, CertifyError::CsrNamesOther { .. }), "{err:?}");
        assert!(err.to_string().contains("`api.default"), "{err}");
        assert_eq!(err.outcome(), crate::metrics::CertifyOutcome::Denied);
    }
    // A CSR with no names is fine: the leaf's name comes from the token.
    let certified = ca.certify(WEB, token.as_bytes(), &csr(&[])).unwrap();
    verifies(&ca, &certified, WEB, T0).unwrap();

    // Garbled CSRs.
    let mut bad_signature = good_csr.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 1;
    for (csr, want) in [
        (&b""[..], "empty"),
        (b"not a csr", "not a DER-encoded PKCS#10"),
        (&good_csr[..good_csr.len() - 5], "not a DER-encoded PKCS#10"),
        (&bad_signature, "proof of possession"),
    ] {
        let err = ca.certify(WEB, token.as_bytes(), csr).unwrap_err();
        assert!(matches!(err, CertifyError::InvalidCsr { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert_eq!(err.outcome(), crate::metrics::CertifyOutcome::Invalid);
    }
}

#[test]
fn garbled_files_stop_start_up_naming_the_file() {
    let dir = temp_dir("garbled");
    let _ = open(&dir);
    let config = IdentityConfig::new(dir.clone());
    let start = || {
        CertificateAuthority::open(&config, fixed_wall_clock(UnixTime::from_secs(T0)))
            .unwrap_err()
            .to_string()
    };
    for file in [
        ISSUER_CERT_FILE,
        ISSUER_KEY_FILE,
        TRUST_ANCHORS_FILE,
        TOKEN_KEY_FILE,
    ] {
        let path = dir.join(file);
        let good = std::fs::read(&path).unwrap();
        for garbage in [
            &b"garbage"[..],
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            std::fs::write(&path, garbage).unwrap();
            let err = start();
            assert!(err.contains(&path.display().to_string()), "{file}: {err}");
        }
        std::fs::write(&path, good).unwrap();
    }
    // A key from elsewhere is named as not matching.
    let other = temp_dir("garbled-other");
    let _ = open(&other);
    std::fs::copy(other.join(ISSUER_KEY_FILE), dir.join(ISSUER_KEY_FILE)).unwrap();
    let err = start();
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains(ISSUER_KEY_FILE), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}

#[test]
fn a_supplied_issuer_must_chain_to_a_supplied_anchor() {
    let ours = temp_dir("supplied-ours");
    let theirs = temp_dir("supplied-theirs");
    let _ = open(&ours);
    let _ = open(&theirs);
    let dir = temp_dir("supplied");
    let config = |anchors: &Path, issuer: &Path| IdentityConfig {
        supplied: Some(SuppliedCa {
            trust_anchors: anchors.join(TRUST_ANCHORS_FILE),
            issuer_cert: issuer.join(ISSUER_CERT_FILE),
            issuer_key: issuer.join(ISSUER_KEY_FILE),
        }),
        ..IdentityConfig::new(dir.clone())
    };
    let start = |config: &IdentityConfig| {
        CertificateAuthority::open(config, fixed_wall_clock(UnixTime::from_secs(T0)))
    };

    let err = start(&config(&ours, &theirs)).unwrap_err().to_string();
    assert!(
        err.contains(&theirs.join(ISSUER_CERT_FILE).display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("do not verify against the trust anchors"),
        "{err}"
    );

    let ca = start(&config(&ours, &ours)).unwrap();
    verifies(&ca, &certify(&ca, WEB), WEB, T0).unwrap();
    // Nothing was bootstrapped in the directory: it holds only the token key.
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [TOKEN_KEY_FILE]);

    // A bundle of both anchors accepts either issuer (a rotation's overlap).
    let both = temp_dir("supplied-both");
    std::fs::create_dir_all(&both).unwrap();
    let mut bundle = std::fs::read(ours.join(TRUST_ANCHORS_FILE)).unwrap();
    bundle.extend(std::fs::read(theirs.join(TRUST_ANCHORS_FILE)).unwrap());
    std::fs::write(both.join(TRUST_ANCHORS_FILE), bundle).unwrap();
    let ca = start(&config(&both, &theirs)).unwrap();
    assert_eq!(ca.trust_anchors().len(), 2);

    // An issuer out of its validity does not start.
    let err = CertificateAuthority::open(
        &config(&ours, &ours),
        fixed_wall_clock(UnixTime::from_secs(T0 + CA_VALIDITY.as_secs() + 1)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("certificate expired"), "{err}");
    for dir in [ours, theirs, dir, both] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn the_issuer_reload_takes_a_new_issuer_signed_by_the_same_anchor() {
    let dir = temp_dir("reload");
    let (clock, now) = clock();
    let ca =
        CertificateAuthority::open(&IdentityConfig::new(dir.clone()), Arc::clone(&clock)).unwrap();
    let old = ca.issuer_certificate();
    assert!(matches!(ca.reload_issuer(), IssuerReload::Unchanged));

    now.store(T0 + 3600, Ordering::Relaxed);
    let not_after = rotate_issuer(&dir, &clock).unwrap();
    assert_eq!(
        not_after,
        UnixTime::from_secs(T0 + 3600 + CA_VALIDITY.as_secs())
    );
    match ca.reload_issuer() {
        IssuerReload::Replaced { not_after: got } => assert_eq!(got, not_after),
        other => panic!("{other:?}"),
    }
    assert_ne!(ca.issuer_certificate(), old);
    let certified = certify(&ca, WEB);
    assert_eq!(certified.intermediates, [ca.issuer_certificate()]);
    verifies(&ca, &certified, WEB, T0 + 3600).unwrap();
    assert!(matches!(ca.reload_issuer(), IssuerReload::Unchanged));

    // A bad edit is rejected once; the new issuer keeps signing.
    let issuer = ca.issuer_certificate();
    std::fs::write(dir.join(ISSUER_CERT_FILE), "garbage").unwrap();
    match ca.reload_issuer() {
        IssuerReload::Rejected(err) => {
            assert!(err.to_string().contains(ISSUER_CERT_FILE), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(ca.reload_issuer(), IssuerReload::Unchanged));
    assert_eq!(certify(&ca, WEB).intermediates, [issuer]);

    // An issuer from another CA is rejected too.
    let other = temp_dir("reload-other");
    let _ = open(&other);
    for file in [ISSUER_KEY_FILE, ISSUER_CERT_FILE] {
        std::fs::copy(other.join(file), dir.join(file)).unwrap();
    }
    assert!(matches!(ca.reload_issuer(), IssuerReload::Rejected(_)));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}

/// Whether webpki accepts `certified` for `name` at `at` against exactly `anchors`.
fn verifies_with(
    anchors: &[rustls::pki_types::CertificateDer<'static>],
    certified: &Certified,
    name: &str,
    at: u64,
) -> bool {
    verify_against(anchors.to_vec(), certified, name, at).is_ok()
}

#[test]
fn an_anchor_rotates_through_a_bundle_without_a_leaf_failing() {
    let dir = temp_dir("anchor-rotation");
    let (clock, now) = clock();
    let ca =
        CertificateAuthority::open(&IdentityConfig::new(dir.clone()), Arc::clone(&clock)).unwrap();
    let old_anchors = ca.trust_anchors();
    let old_leaf = certify(&ca, WEB);
    // Retiring before any new anchor is a no-op for the bundle's one anchor.
    assert_eq!(retire_anchors(&dir, &clock).unwrap(), 0);
    assert!(matches!(ca.reload_anchors(), AnchorsReload::Unchanged));

    // 1. A new anchor joins the bundle; the controller trusts both.
    now.store(T0 + 60, Ordering::Relaxed);
    add_anchor(&dir, &clock).unwrap();
    assert!(dir.join(ANCHOR_KEY_PREVIOUS_FILE).exists());
    let version = ca.trust_anchors_version();
    match ca.reload_anchors() {
        AnchorsReload::Replaced { count, .. } => assert_eq!(count, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(ca.trust_anchors_version(), version + 1);
    let bundle = ca.trust_anchors();
    assert_eq!(bundle[0], old_anchors[0], "the old anchor stays first");
    // Retiring now would strand the issuer, which the old anchor signed.
    let err = retire_anchors(&dir, &clock).unwrap_err();
    assert!(err.to_string().contains("rotate-issuer"), "{err}");

    // 2. The issuer moves to the new anchor; old and new leaves verify against the bundle.
    now.store(T0 + 120, Ordering::Relaxed);
    rotate_issuer(&dir, &clock).unwrap();
    assert!(matches!(ca.reload_anchors(), AnchorsReload::Unchanged));
    assert!(matches!(ca.reload_issuer(), IssuerReload::Replaced { .. }));
    let new_leaf = certify(&ca, WEB);
    for leaf in [&old_leaf, &new_leaf] {
        assert!(verifies_with(&bundle, leaf, WEB, T0 + 130));
    }
    // A proxy still on the old bundle alone does not trust the new leaves: why step 1 must
    // reach every proxy before step 2.
    assert!(!verifies_with(&old_anchors, &new_leaf, WEB, T0 + 130));

    // 3. Once the old leaves are gone, the old anchor is retired.
    assert_eq!(retire_anchors(&dir, &clock).unwrap(), 1);
    match ca.reload_anchors() {
        AnchorsReload::Replaced { count, .. } => assert_eq!(count, 1),
        other => panic!("{other:?}"),
    }
    let retired = ca.trust_anchors();
    assert_eq!(retired, [bundle[1].clone()]);
    assert!(verifies_with(&retired, &new_leaf, WEB, T0 + 130));
    assert!(!verifies_with(&retired, &old_leaf, WEB, T0 + 130));

    // A bundle the issuer does not chain to is refused once, and the anchors stay.
    std::fs::write(dir.join(TRUST_ANCHORS_FILE), {
        let other = temp_dir("anchor-rotation-other");
        let _ = open(&other);
        let pem = std::fs::read(other.join(TRUST_ANCHORS_FILE)).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
        pem
    })
    .unwrap();
    match ca.reload_anchors() {
        AnchorsReload::Rejected(err) => {
            assert!(err.to_string().contains("does not chain"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(ca.reload_anchors(), AnchorsReload::Unchanged));
    assert_eq!(ca.trust_anchors(), retired);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_in_memory_ca_rotates_its_anchor() {
    let ca = memory_ca(KeyKind::Ed25519);
    let old_leaf = certify(&ca, WEB);
    ca.add_anchor_in_memory().unwrap();
    assert_eq!(ca.trust_anchors().len(), 2);
    assert!(
        ca.retire_anchors_in_memory().is_err(),
        "the issuer is still the old anchor's"
    );
    ca.rotate_issuer_in_memory().unwrap();
    let new_leaf = certify(&ca, WEB);
    let bundle = ca.trust_anchors();
    assert!(verifies_with(&bundle, &old_leaf, WEB, T0 + 1));
    assert!(verifies_with(&bundle, &new_leaf, WEB, T0 + 1));
    ca.retire_anchors_in_memory().unwrap();
    assert_eq!(ca.trust_anchors(), [bundle[1].clone()]);
    assert!(!verifies_with(&ca.trust_anchors(), &old_leaf, WEB, T0 + 1));
}

#[test]
fn issue_token_needs_a_bootstrapped_directory_and_a_valid_name() {
    let dir = temp_dir("token");
    let err = issue_token(&dir, WEB).unwrap_err().to_string();
    assert!(err.contains("start the controller"), "{err}");
    let ca = open(&dir);
    let err = issue_token(&dir, "Not_A_Name").unwrap_err();
    assert!(matches!(err, TokenError::InvalidIdentity { .. }), "{err:?}");
    let token = issue_token(&dir, WEB).unwrap();
    assert_eq!(token, ca.issue_token(WEB).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn identities_are_dns_like_names() {
    assert!(check_identity(WEB).is_ok());
    for bad in [
        "",
        "Web",
        "a..b",
        "-a",
        "a-",
        "a_b",
        &"a".repeat(64),
        &"a.".repeat(127),
    ] {
        assert!(check_identity(bad).is_err(), "{bad:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_requests_never_panic(
        identity in "[a-z.]{0,20}",
        token in proptest::collection::vec(any::<u8>(), 0..200),
        csr in proptest::collection::vec(any::<u8>(), 0..600),
        valid_token in any::<bool>(),
    ) {
        let ca = shared_ca();
        let token = if valid_token {
            ca.issue_token(WEB).unwrap().into_bytes()
        } else {
            token
        };
        let _ = ca.certify(&identity, &token, &csr);
        let _ = ca.certify(WEB, &token, &csr);
    }

    #[test]
    fn mutated_csrs_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let ca = shared_ca();
        let mut csr = good_csr().clone();
        let i = at.index(csr.len());
        csr[i] = byte;
        let token = ca.issue_token(WEB).unwrap();
        let _ = ca.certify(WEB, token.as_bytes(), &csr);
    }
}

fn shared_ca() -> &'static CertificateAuthority {
    static CA: std::sync::OnceLock<CertificateAuthority> = std::sync::OnceLock::new();
    CA.get_or_init(|| memory_ca(KeyKind::EcdsaP256))
}

fn good_csr() -> &'static Vec<u8> {
    static CSR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CSR.get_or_init(|| csr(&[WEB]))
}
