//! TLS to vCenter, verified against a pinned SHA-256 certificate thumbprint.
//!
//! vCenter usually presents a certificate from its own VMCA, which the appliance
//! does not trust, so the operator configures the thumbprint they see in the
//! vSphere client (or `openssl x509 -fingerprint -sha256`), as VDDK and nbdkit's
//! vddk plugin also take it. The server is accepted exactly when the SHA-256 of
//! the certificate it presents equals that thumbprint: no chain, name or date is
//! checked, and nothing else is ever accepted; there is no setting that turns
//! verification off. The handshake's signature is still verified with the
//! presented certificate's key, so a server must hold the pinned certificate's
//! private key, not only a copy of the certificate.
//!
//! A mismatch is remembered so that the client can report it as what it is (the
//! configured and the presented thumbprints), instead of the transport error the
//! HTTP layer makes of it.

use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// A SHA-256 certificate thumbprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Thumbprint([u8; 32]);

impl Thumbprint {
    /// Parses 64 hex digits, in pairs separated by `:` (as vCenter shows it) or
    /// not at all, in either case.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let hex: String = if t.contains(':') {
            let pairs: Vec<&str> = t.split(':').collect();
            if pairs.iter().any(|p| p.len() != 2) {
                return Err(format!("'{t}' is not a SHA-256 thumbprint (32 hex pairs separated by ':')"));
            }
            pairs.concat()
        } else {
            t.to_string()
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{t}' is not a SHA-256 thumbprint (64 hex digits, e.g. AB:CD:...)"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self(out))
    }

    /// The thumbprint of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }
}

impl std::fmt::Display for Thumbprint {
    /// Upper-case hex pairs joined by `:`, as vCenter and VDDK write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

/// Accepts exactly the certificate with the pinned thumbprint.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: Thumbprint,
    /// The thumbprint of the last certificate refused, for the error message.
    refused: Mutex<Option<Thumbprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(expected: Thumbprint) -> Self {
        Self { expected, refused: Mutex::new(None), provider: Arc::new(rustls::crypto::ring::default_provider()) }
    }

    /// A rustls client configuration that uses this verifier and no other.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, String> {
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(config)
    }

    /// The certificate refused last, if any: a mismatch, not a network failure.
    pub fn take_refused(&self) -> Option<Thumbprint> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Thumbprint::of(end_entity.as_ref());
        if presented == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(presented);
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_parse_in_the_usual_spellings() {
        let colons = "DD:01:70:E7:44:BA:EF:B2:29:B7:6B:EB:1A:2F:27:6D:96:A8:02:AF:84:B9:16:74:CB:E5:4E:46:77:CF:EA:5A";
        let t = Thumbprint::parse(colons).unwrap();
        assert_eq!(t.to_string(), colons);
        assert_eq!(Thumbprint::parse(&colons.to_lowercase()).unwrap(), t);
        assert_eq!(Thumbprint::parse(&colons.replace(':', "")).unwrap(), t);
        assert_eq!(Thumbprint::parse(&format!(" {colons}\n")).unwrap(), t);
    }

    #[test]
    fn wrong_thumbprints_are_refused() {
        for bad in [
            "",
            "DD:01",
            // SHA-1, the old vSphere thumbprint: 20 pairs.
            "DD:01:70:E7:44:BA:EF:B2:29:B7:6B:EB:1A:2F:27:6D:96:A8:02:AF",
            "DD:01:70:E7:44:BA:EF:B2:29:B7:6B:EB:1A:2F:27:6D:96:A8:02:AF:84:B9:16:74:CB:E5:4E:46:77:CF:EA:5G",
            "D:D01:70:E7:44:BA:EF:B2:29:B7:6B:EB:1A:2F:27:6D:96:A8:02:AF:84:B9:16:74:CB:E5:4E:46:77:CF:EA:5A",
        ] {
            assert!(Thumbprint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_thumbprint_of_a_certificate_is_its_sha256() {
        // SHA-256 of the empty input, a known value.
        assert_eq!(
            Thumbprint::of(b"").to_string().replace(':', "").to_lowercase(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
