//! The crypto seam shared by the proxy and the controller: the rustls provider they use
//! (algorithms, randomness, key exchange) and the kind of private key they make.
//!
//! Production passes [`Crypto::system`]: ring's algorithms, the operating system's
//! randomness, ECDSA P-256 keys. The simulation passes a provider of its own whose randomness
//! and key exchange are seeded, with [`KeyKind::Ed25519`] keys drawn from that randomness, so
//! the same seed gives the same keys, certificates and bytes on the wire. That provider lives
//! in the simulation crate, which neither the proxy's nor the controller's binary links (CI
//! checks the release binaries for its marker).

use std::fmt;
use std::sync::Arc;

pub use conduit_core::identity::KeyKind;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivatePkcs8KeyDer;

/// The crypto a proxy or the controller is made with (see the [module docs](self)).
#[derive(Clone)]
pub struct Crypto {
    /// The rustls crypto provider: algorithms, randomness, key exchange. Every TLS
    /// configuration is built on it, and the CA's serial numbers and token key come from its
    /// randomness.
    pub provider: Arc<CryptoProvider>,
    /// The kind of key made.
    pub keys: KeyKind,
}

impl fmt::Debug for Crypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crypto")
            .field("random", &self.provider.secure_random)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Crypto {
    /// ring's algorithms and the operating system's randomness; ECDSA P-256 keys.
    #[must_use]
    pub fn system() -> Self {
        Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            keys: KeyKind::EcdsaP256,
        }
    }

    /// A new private key of [`Self::keys`]' kind.
    ///
    /// # Errors
    ///
    /// The crypto library's reason, when the randomness or the key fails.
    pub fn new_key(&self) -> Result<rcgen::KeyPair, String> {
        match self.keys {
            KeyKind::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|err| err.to_string()),
            KeyKind::Ed25519 => {
                let mut seed = [0u8; 32];
                self.fill(&mut seed)?;
                let der = conduit_core::identity::ed25519_pkcs8(&seed);
                rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(&der[..]),
                    &rcgen::PKCS_ED25519,
                )
                .map_err(|err| err.to_string())
            }
        }
    }

    /// Fills `dest` from the provider's randomness.
    ///
    /// # Errors
    ///
    /// When the random source fails.
    pub fn fill(&self, dest: &mut [u8]) -> Result<(), String> {
        self.provider
            .secure_random
            .fill(dest)
            .map_err(|_| "the random source failed".to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn keys_of_each_kind_sign_a_certificate() {
        for keys in [KeyKind::EcdsaP256, KeyKind::Ed25519] {
            let crypto = Crypto {
                keys,
                ..Crypto::system()
            };
            let key = crypto.new_key().unwrap();
            let params = rcgen::CertificateParams::new(vec!["a.b".to_owned()]).unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert!(!cert.der().is_empty());
            // The provider loads it for TLS.
            let der = rustls::pki_types::PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ));
            crypto.provider.key_provider.load_private_key(der).unwrap();
        }
        // Two Ed25519 keys from the OS's randomness differ.
        let crypto = Crypto {
            keys: KeyKind::Ed25519,
            ..Crypto::system()
        };
        assert_ne!(
            crypto.new_key().unwrap().public_key_raw(),
            crypto.new_key().unwrap().public_key_raw()
        );
    }
}
