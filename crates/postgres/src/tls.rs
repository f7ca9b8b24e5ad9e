//! TLS for both connections to the source (replication and SQL): one rustls
//! client configuration built from `source.sslmode` / `source.sslrootcert`,
//! the transport stream type, and the SCRAM channel-binding hash.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_platform_verifier::BuilderVerifierExt;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::error::WireError;
use crate::{SourceConfig, SslMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default rustls provider, which the HTTP client
/// (reqwest, built without a provider of its own: its default is aws-lc-rs,
/// a C build) takes. Before the first HTTP client is built; idempotent.
pub fn install_default_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Err only when a provider is installed already, which then serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The rustls configuration for `cfg.sslmode`, or `None` for `disable`.
///
/// `prefer` and `require` encrypt but do not authenticate the server, as in
/// libpq; `verify-full` checks the chain and the host name against
/// `sslrootcert` only, or without it against the system's trust store
/// through the platform verifier, as HTTP targets do.
pub(crate) fn client_config(cfg: &SourceConfig) -> Result<Option<ClientConfig>, WireError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WireError::Tls(format!("cannot set up TLS protocol versions: {e}")))?;
    let mut config = match cfg.sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
        SslMode::VerifyFull => match &cfg.sslrootcert {
            Some(path) => builder
                .with_root_certificates(root_store(path)?)
                .with_no_client_auth(),
            None => builder
                .with_platform_verifier()
                .map_err(|e| {
                    WireError::Tls(format!(
                        "cannot use the system's CA certificates for source.sslmode = \
                         verify-full ({e}); set source.sslrootcert to the PEM file of the \
                         server's CA"
                    ))
                })?
                .with_no_client_auth(),
        },
    };
    // Lets PostgreSQL 17+ servers confirm the protocol; older ones ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(config))
}

fn root_store(path: &Path) -> Result<RootCertStore, WireError> {
    let mut roots = RootCertStore::empty();
    let problem = |e: pem::Error| {
        WireError::Tls(match e {
            pem::Error::Io(e) => {
                format!("cannot read source.sslrootcert {}: {e}", path.display())
            }
            e => format!(
                "source.sslrootcert {} is not valid PEM: {e}",
                path.display()
            ),
        })
    };
    for cert in CertificateDer::pem_file_iter(path).map_err(problem)? {
        let cert = cert.map_err(problem)?;
        roots.add(cert).map_err(|e| {
            WireError::Tls(format!(
                "source.sslrootcert {} holds an unusable certificate: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(WireError::Tls(format!(
            "source.sslrootcert {} holds no PEM certificates (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(roots)
}

/// The server name rustls checks the certificate against (and sends as SNI).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, WireError> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        WireError::Tls(format!(
            "source host {host:?} cannot be used as a TLS server name: {e}"
        ))
    })
}

/// Accepts any certificate but still checks the handshake signatures, so the
/// session is encrypted to whoever holds the presented key (libpq's
/// `sslmode=require`).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The byte stream to the server.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    #[cfg(any(test, feature = "test-pipe"))]
    Test(tokio::io::DuplexStream),
}

impl Transport {
    /// The `tls-server-end-point` channel-binding data (RFC 5929): a hash of
    /// the server's certificate. `None` without TLS or when the certificate's
    /// signature algorithm does not determine a hash (e.g. RSA-PSS, Ed25519),
    /// the same cases in which the server cannot compute it either.
    pub(crate) fn channel_binding(&self) -> Option<Vec<u8>> {
        let Transport::Tls(tls) = self else {
            return None;
        };
        let cert = tls.get_ref().1.peer_certificates()?.first()?;
        cert_end_point_hash(cert.as_ref())
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Acknowledges at once what the kernel has received so far, instead of
    /// at the delayed-ACK timer. Called when a read has drained the socket,
    /// the end of a burst from the server: the walsender sends a transaction
    /// as one small segment per change, and a sender whose congestion
    /// control paces by the acknowledgements it gets (BBR) otherwise holds a
    /// transaction's last changes back until the delayed ACK, 5–15 ms later
    /// (README, commit → ack latency). Linux resets the option after it acts,
    /// hence once per drained read. Best effort: a failure changes timing only.
    pub(crate) fn acknowledge_now(&self) {
        #[cfg(target_os = "linux")]
        {
            let tcp = match self {
                Transport::Tcp(tcp) => tcp,
                Transport::Tls(tls) => tls.get_ref().0,
                _ => return,
            };
            let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

fn cert_end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(der)? {
        HashAlg::Sha256 => sha2::Sha256::digest(der).to_vec(),
        HashAlg::Sha384 => sha2::Sha384::digest(der).to_vec(),
        HashAlg::Sha512 => sha2::Sha512::digest(der).to_vec(),
    })
}

/// The hash RFC 5929 prescribes for a certificate: that of its signature
/// algorithm, with MD5 and SHA-1 upgraded to SHA-256.
fn signature_hash(der: &[u8]) -> Option<HashAlg> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    // AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }
    let (tag, cert, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _tbs, rest) = der_tlv(cert)?;
    let (tag, alg, _) = der_tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_tlv(alg)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01];
    if oid == ECDSA_SHA1 {
        return Some(HashAlg::Sha256);
    }
    if let Some(last) = oid.strip_prefix(RSA) {
        return match last {
            // md5WithRSA, sha1WithRSA, sha256WithRSA, sha224WithRSA
            [0x04 | 0x05 | 0x0B | 0x0E] => Some(HashAlg::Sha256),
            [0x0C] => Some(HashAlg::Sha384),
            [0x0D] => Some(HashAlg::Sha512),
            _ => None,
        };
    }
    if let Some(last) = oid.strip_prefix(ECDSA_SHA2) {
        return match last {
            [0x01 | 0x02] => Some(HashAlg::Sha256),
            [0x03] => Some(HashAlg::Sha384),
            [0x04] => Some(HashAlg::Sha512),
            _ => None,
        };
    }
    None
}

/// Splits one DER element off `input`: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(any(test, feature = "test-pipe"))]
            Transport::Test(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(any(test, feature = "test-pipe"))]
            Transport::Test(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(any(test, feature = "test-pipe"))]
            Transport::Test(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(any(test, feature = "test-pipe"))]
            Transport::Test(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    pub(crate) fn cfg(sslmode: SslMode, sslrootcert: Option<PathBuf>) -> SourceConfig {
        SourceConfig {
            url_display: "postgresql://steward@localhost/odoo".into(),
            host: "localhost".into(),
            port: 5432,
            user: "steward".into(),
            dbname: "odoo".into(),
            password: None,
            sslmode,
            sslrootcert,
            connect_timeout: Duration::from_secs(5),
            slot: "steward".into(),
            publication: "steward".into(),
            status_interval: Duration::from_secs(10),
            create_publication: false,
            heartbeat_interval: None,
            streaming: true,
            other_hosts: Vec::new(),
            target_session_attrs: crate::TargetSessionAttrs::Any,
            failover: false,
            heartbeat_via: None,
        }
    }

    #[test]
    fn disable_has_no_tls_config() {
        assert!(client_config(&cfg(SslMode::Disable, None))
            .unwrap()
            .is_none());
        assert!(client_config(&cfg(SslMode::Require, None))
            .unwrap()
            .is_some());
        assert!(client_config(&cfg(SslMode::Prefer, None))
            .unwrap()
            .is_some());
    }

    #[test]
    fn bad_root_cert_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(&cfg(SslMode::VerifyFull, Some(missing))).unwrap_err();
        assert!(e.to_string().contains("source.sslrootcert"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(&cfg(SslMode::VerifyFull, Some(empty))).unwrap_err();
        assert!(e.to_string().contains("no PEM certificates"), "{e}");
    }

    #[test]
    fn server_names() {
        assert!(server_name("db.example.com").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("bad host!").is_err());
    }

    /// Minimal DER: SEQUENCE { SEQUENCE {} tbs, SEQUENCE { OID }, BIT STRING }.
    fn fake_cert(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut inner = vec![0x30, 0x00];
        inner.push(0x30);
        inner.push(alg.len() as u8);
        inner.extend(alg);
        inner.extend([0x03, 0x01, 0x00]);
        let mut cert = vec![0x30, inner.len() as u8];
        cert.extend(inner);
        cert
    }

    #[test]
    fn channel_binding_hash_follows_signature_algorithm() {
        let rsa256 = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B];
        let rsa384 = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C];
        let rsa_sha1 = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05];
        let rsa_pss = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0A];
        let ec512 = [0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x04];
        let ed25519 = [0x2B, 0x65, 0x70];
        assert_eq!(signature_hash(&fake_cert(&rsa256)), Some(HashAlg::Sha256));
        assert_eq!(signature_hash(&fake_cert(&rsa384)), Some(HashAlg::Sha384));
        assert_eq!(signature_hash(&fake_cert(&rsa_sha1)), Some(HashAlg::Sha256));
        assert_eq!(signature_hash(&fake_cert(&ec512)), Some(HashAlg::Sha512));
        assert_eq!(signature_hash(&fake_cert(&rsa_pss)), None);
        assert_eq!(signature_hash(&fake_cert(&ed25519)), None);
        let c = fake_cert(&rsa256);
        assert_eq!(cert_end_point_hash(&c).unwrap().len(), 32);
        // Truncated or garbage input: no hash, no panic.
        for n in 0..c.len() {
            assert_eq!(signature_hash(&c[..n]), None);
        }
        assert_eq!(signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
