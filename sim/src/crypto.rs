//! Seeded crypto for simulated worlds, so the same seed gives the same keys, certificates and
//! TLS bytes on the wire (`../shared/reference/turmoil.md` §5).
//!
//! A TLS 1.3 handshake with ring draws randomness in four places, each replaced here:
//! 1. rustls' `SecureRandom` (client and server randoms, session IDs and tickets): a
//!    [`DetRng`] stream;
//! 2. the key exchange's ephemeral secret, which ring draws from its own sealed OS generator:
//!    an X25519 group of our own ([x25519-dalek]) whose secrets come from the same stream;
//! 3. ECDSA signatures, which draw a nonce inside ring: the world's keys are Ed25519
//!    ([`KeyKind::Ed25519`], made from the stream by [`Crypto::new_key`]), whose signatures are
//!    deterministic;
//! 4. time: certificates are checked on the simulated wall clock (the proxies' and the
//!    controller's injected clocks).
//!
//! The CA's serial numbers and token key come from the same stream through [`Crypto::fill`].
//!
//! The stream is per thread (a world runs on one thread, and turmoil steps its hosts in a
//! fixed order) and restarts from the world's seed when the world is built ([`reseed`]).
//!
//! **Not for production**: the randomness is a fast non-cryptographic generator from a
//! 64-bit seed. Only this crate constructs it; the proxy and controller take their crypto as a
//! parameter ([`Crypto`]) and their binaries do not link this crate. CI checks the release
//! binaries for [`MARKER`], which every use of this provider carries in its `Debug` output.
//!
//! [x25519-dalek]: https://docs.rs/x25519-dalek

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use conduit_core::rand::{DetRng, Rng as _};
use conduit_proto::crypto::{Crypto, KeyKind};
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, GetRandomFailed, SecureRandom, SharedSecret,
    SupportedKxGroup,
};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// The string that marks a binary linking this provider (CI looks for it in the release
/// proxy and controller, where it must not be).
pub const MARKER: &str = "conduit-sim-seeded-crypto: simulation only, never in production";

thread_local! {
    static STREAM: RefCell<DetRng> = RefCell::new(DetRng::new(0));
}

/// Restarts this thread's crypto randomness from `seed` (a world does, when it is built).
pub fn reseed(seed: u64) {
    STREAM.with(|stream| *stream.borrow_mut() = DetRng::new(seed));
}

fn fill(dest: &mut [u8]) {
    STREAM.with(|stream| {
        let mut stream = stream.borrow_mut();
        for chunk in dest.chunks_mut(8) {
            let word = stream.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    });
}

/// rustls' randomness, from this thread's stream.
struct SeededRandom;

impl fmt::Debug for SeededRandom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MARKER)
    }
}

impl SecureRandom for SeededRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), GetRandomFailed> {
        fill(dest);
        Ok(())
    }
}

/// X25519 with secrets from this thread's stream.
#[derive(Debug)]
struct SeededX25519;

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut bytes = [0u8; 32];
        fill(&mut bytes);
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(Exchange { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct Exchange {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl ActiveKeyExchange for Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        let peer: [u8; 32] = peer
            .try_into()
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // RFC 8446 §7.4.2: an all-zero shared secret (a low-order peer key) is refused.
        if !shared.was_contributory() {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

static RANDOM: SeededRandom = SeededRandom;
static X25519: SeededX25519 = SeededX25519;

/// The simulation's crypto: ring's algorithms with the seeded randomness and key exchange,
/// and Ed25519 keys (see the [module docs](self)).
#[must_use]
pub fn seeded() -> Crypto {
    let mut provider: CryptoProvider = rustls::crypto::ring::default_provider();
    provider.secure_random = &RANDOM;
    provider.kx_groups = vec![&X25519];
    Crypto {
        provider: Arc::new(provider),
        keys: KeyKind::Ed25519,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_keys_and_another_seed_others() {
        let keys = |seed| {
            reseed(seed);
            let crypto = seeded();
            (
                crypto.new_key().unwrap().serialize_der(),
                crypto.new_key().unwrap().serialize_der(),
            )
        };
        let (a, b) = keys(7);
        assert_ne!(a, b, "successive keys differ");
        assert_eq!(keys(7), (a.clone(), b));
        assert_ne!(keys(8).0, a);
        assert!(format!("{:?}", seeded()).contains(MARKER));
    }

    /// Every byte of a TLS 1.3 handshake and one record each way, client then server, for
    /// a world seeded with `seed`.
    fn handshake_bytes(seed: u64) -> Vec<u8> {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use std::io::{Read as _, Write as _};

        reseed(seed);
        let crypto = seeded();
        let key = crypto.new_key().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["api.sim".to_owned()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![1]));
        let cert = params.self_signed(&key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&crypto.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&crypto.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let name = ServerName::try_from("api.sim").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        client.writer().write_all(b"ping").unwrap();
        server.writer().write_all(b"pong").unwrap();
        let mut wire = Vec::new();
        let mut received = Vec::new();
        for _ in 0..10 {
            let mut bytes = Vec::new();
            client.write_tls(&mut bytes).unwrap();
            wire.extend_from_slice(&bytes);
            server.read_tls(&mut &bytes[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut bytes = Vec::new();
            server.write_tls(&mut bytes).unwrap();
            wire.extend_from_slice(&bytes);
            client.read_tls(&mut &bytes[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        server.reader().read_to_end(&mut received).ok();
        client.reader().read_to_end(&mut received).ok();
        assert_eq!(received, b"pingpong");
        wire
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_on_the_wire() {
        let first = handshake_bytes(11);
        assert!(
            first.len() > 500,
            "a whole handshake: {} bytes",
            first.len()
        );
        assert_eq!(handshake_bytes(11), first);
        assert_ne!(handshake_bytes(12), first);
    }

    #[test]
    fn the_key_exchange_agrees_and_refuses_a_bad_share() {
        reseed(1);
        let client = X25519.start().unwrap();
        let server = X25519.start().unwrap();
        let server_public = server.pub_key().to_vec();
        let from_client = client.complete(&server_public).unwrap();
        let client_public = X25519.start().unwrap();
        // A fresh exchange against the server's share agrees with the server's view of it.
        let client_share = client_public.pub_key().to_vec();
        let a = client_public.complete(&server_public).unwrap();
        let b = server.complete(&client_share).unwrap();
        assert_eq!(a.secret_bytes(), b.secret_bytes());
        assert_ne!(from_client.secret_bytes(), a.secret_bytes());
        // Wrong length, and the all-zero (low-order) point.
        assert!(X25519.start().unwrap().complete(&[1; 31]).is_err());
        assert!(X25519.start().unwrap().complete(&[0; 32]).is_err());
    }
}
