//! TLS for the development harness: throwaway certificates made with the
//! `openssl` command line tool, and the rustls server configuration the
//! recording [`Receiver`](super::Receiver) serves HTTPS with (optionally
//! requiring a client certificate).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A CA, a server certificate for localhost / 127.0.0.1 and a client
/// certificate, both signed by the CA; PEM files in one directory.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA's certificate, to trust.
    pub ca_cert: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Its private key.
    pub server_key: PathBuf,
    /// Client certificate (for client authentication).
    pub client_cert: PathBuf,
    /// Its private key.
    pub client_key: PathBuf,
}

const OPENSSL_CNF: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = steward-test\n\
[ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier = hash\n\
[server_ext]\nbasicConstraints = critical,CA:FALSE\n\
keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
subjectAltName = DNS:localhost,IP:127.0.0.1\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
[client_ext]\nbasicConstraints = critical,CA:FALSE\n\
keyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n";

impl TestPki {
    /// Writes the files into `dir` (which must exist). Needs `openssl` on the PATH.
    pub fn generate(dir: &Path) -> io::Result<TestPki> {
        let cnf = dir.join("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF)?;
        let p = |name: &str| dir.join(name);
        let pki = TestPki {
            ca_cert: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        };
        let ca_key = p("ca.key");
        let s = |path: &Path| path.display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let cnf_s = s(&cnf);
        let ca_key_s = s(&ca_key);
        let ca_s = s(&pki.ca_cert);
        let mut ca = vec!["req", "-x509", "-config", &cnf_s, "-extensions", "ca_ext"];
        ca.extend(ec);
        ca.extend([
            "-days",
            "7",
            "-subj",
            "/CN=steward test CA",
            "-keyout",
            &ca_key_s,
            "-out",
            &ca_s,
        ]);
        openssl(&ca)?;
        for (cert, key, cn, ext) in [
            (
                &pki.server_cert,
                &pki.server_key,
                "/CN=localhost",
                "server_ext",
            ),
            (
                &pki.client_cert,
                &pki.client_key,
                "/CN=steward",
                "client_ext",
            ),
        ] {
            let (cert_s, key_s, csr_s) = (s(cert), s(key), format!("{}.csr", s(cert)));
            let mut req = vec!["req", "-new", "-config", &cnf_s];
            req.extend(ec);
            req.extend(["-subj", cn, "-keyout", &key_s, "-out", &csr_s]);
            openssl(&req)?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                &ca_s,
                "-CAkey",
                &ca_key_s,
                "-set_serial",
                "2",
                "-days",
                "7",
                "-extfile",
                &cnf_s,
                "-extensions",
                ext,
                "-out",
                &cert_s,
            ])?;
        }
        Ok(pki)
    }
}

fn openssl(args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run openssl ({e}); install it with: apt-get install openssl"),
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let named = |e: pem::Error| io::Error::other(format!("{}: {e}", path.display()));
    CertificateDer::pem_file_iter(path)
        .map_err(named)?
        .collect::<Result<_, _>>()
        .map_err(named)
}

/// A server configuration from PEM files; with `client_ca`, clients must
/// present a certificate signed by it.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> io::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            io::Error::other(format!("no private key in {}", key.display()))
        }
        e => io::Error::other(format!("{}: {e}", key.display())),
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(io::Error::other)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(io::Error::other)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
