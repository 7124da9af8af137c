//! A small STUN/TURN client over UDP, TCP and TLS: what the probe and the doctor ask coturn.
//! Binding (the address coturn sees), Allocate with fresh TURN REST credentials (which proves
//! the shared secret), CreatePermission and Send (the relay carrying data), and Refresh with
//! lifetime 0 to free the allocation. Every wait is bounded by the caller's time-out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use stun_rs::attributes::stun::{
    ErrorCode, MessageIntegrity, Nonce, Realm, UserName, XorMappedAddress,
};
use stun_rs::attributes::turn::{
    Data, LifeTime, RequestedTrasport, XorPeerAddress, XorRelayedAddress,
};
use stun_rs::methods::{ALLOCATE, BINDING, CREATE_PERMMISSION, DATA, REFRESH, SEND};
use stun_rs::{
    Algorithm, AlgorithmId, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunAttribute, StunMessage, StunMessageBuilder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::credentials;
use super::ice::HostPort;
use super::probe::ProbeOutcome;

/// How long one UDP request waits before it is sent again.
const RETRANSMIT: Duration = Duration::from_millis(250);
/// Largest STUN message read over TCP or TLS.
const MAX_MESSAGE: usize = 4096;

/// How a client reaches coturn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// The URL clients are given for `target` over this transport.
    pub(crate) fn url(self, target: &HostPort) -> String {
        match self {
            Transport::Udp => format!("turn:{}", target.authority()),
            Transport::Tcp => format!("turn:{}?transport=tcp", target.authority()),
            Transport::Tls => format!("turns:{}?transport=tcp", target.authority()),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
}

/// What a TLS handshake showed of coturn's certificate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Certificate {
    /// The names it is for (DNS names and IP addresses of its subject alternative names, or
    /// the common name).
    pub names: Vec<String>,
    /// When it expires (seconds since the epoch).
    pub not_after: i64,
    /// Whether this machine trusts it for the name it was reached at, or why not.
    pub trust: Result<(), String>,
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection to one coturn listener.
pub(crate) struct Client {
    conn: Conn,
    /// What this side's socket is bound to.
    pub local: SocketAddr,
    buffer: Vec<u8>,
}

/// Trust anchors for `turns:` checks.
pub(crate) type Roots = Arc<rustls::RootCertStore>;

/// The system's trust anchors (Debian's bundle), and those of `extra` PEM files.
pub(crate) fn roots(extra: &[std::path::PathBuf]) -> Result<Roots, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    let system = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if system.exists()
        && let Ok(certs) = CertificateDer::pem_file_iter(system)
    {
        let _ = store.add_parsable_certificates(certs.flatten());
    }
    for file in extra {
        let certs: Vec<_> = CertificateDer::pem_file_iter(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not a PEM certificate file: {e}", file.display()))?;
        let (added, _) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{} holds no certificate", file.display()));
        }
    }
    Ok(Arc::new(store))
}

fn unreachable(e: impl std::fmt::Display) -> ProbeOutcome {
    ProbeOutcome::Unreachable(e.to_string())
}

impl Client {
    /// Connects to `target` over `transport`; for TLS, also says what the certificate is.
    pub(crate) async fn connect(
        target: &HostPort,
        transport: Transport,
        roots: Option<&Roots>,
    ) -> Result<(Self, Option<Certificate>), ProbeOutcome> {
        let address = tokio::net::lookup_host(target.authority())
            .await
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", target.host)))?
            .next()
            .ok_or_else(|| unreachable(format!("{} has no address", target.host)))?;
        let new = |conn, local| Self {
            conn,
            local,
            buffer: Vec::new(),
        };
        match transport {
            Transport::Udp => {
                let any: SocketAddr = if address.is_ipv4() {
                    SocketAddr::from(([0, 0, 0, 0], 0))
                } else {
                    SocketAddr::from(([0u16; 8], 0))
                };
                let socket = UdpSocket::bind(any)
                    .await
                    .map_err(|e| ProbeOutcome::Failed(format!("cannot open a UDP socket: {e}")))?;
                socket.connect(address).await.map_err(unreachable)?;
                let local = socket.local_addr().map_err(unreachable)?;
                Ok((new(Conn::Udp(socket), local), None))
            }
            Transport::Tcp => {
                let stream = TcpStream::connect(address).await.map_err(unreachable)?;
                let local = stream.local_addr().map_err(unreachable)?;
                Ok((new(Conn::Tcp(stream), local), None))
            }
            Transport::Tls => {
                let stream = TcpStream::connect(address).await.map_err(unreachable)?;
                let local = stream.local_addr().map_err(unreachable)?;
                let verifier = Arc::new(Recording::new(roots)?);
                let config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ProbeOutcome::Failed(format!("TLS: {e}")))?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier.clone())
                    .with_no_client_auth();
                let name =
                    rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
                        ProbeOutcome::Failed(format!("{} as a TLS name: {e}", target.host))
                    })?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, stream)
                    .await
                    .map_err(|e| ProbeOutcome::Failed(format!("the TLS handshake failed: {e}")))?;
                let certificate = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|der| describe_certificate(der, verifier.verdict()));
                Ok((new(Conn::Tls(Box::new(tls)), local), certificate))
            }
        }
    }

    /// Sends a request and waits for the answer with its transaction id (retransmitting over
    /// UDP); indications that come meanwhile are skipped.
    pub(crate) async fn transact(
        &mut self,
        request: &StunMessage,
    ) -> Result<StunMessage, ProbeOutcome> {
        let out = encode(request)?;
        loop {
            self.send(&out).await?;
            let deadline = tokio::time::Instant::now() + RETRANSMIT;
            loop {
                let received = match &self.conn {
                    Conn::Udp(_) => match tokio::time::timeout_at(deadline, self.receive()).await {
                        Err(_) => break,
                        Ok(r) => r?,
                    },
                    _ => self.receive().await?,
                };
                if received.transaction_id() == request.transaction_id() {
                    return Ok(received);
                }
            }
        }
    }

    /// Sends a message that wants no answer (an indication).
    pub(crate) async fn indicate(&mut self, message: &StunMessage) -> Result<(), ProbeOutcome> {
        let out = encode(message)?;
        self.send(&out).await
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), ProbeOutcome> {
        match &mut self.conn {
            Conn::Udp(socket) => socket.send(data).await.map(|_| ()),
            Conn::Tcp(stream) => stream.write_all(data).await,
            Conn::Tls(stream) => stream.write_all(data).await,
        }
        .map_err(unreachable)
    }

    /// The next STUN message coturn sends.
    pub(crate) async fn receive(&mut self) -> Result<StunMessage, ProbeOutcome> {
        let decoder = MessageDecoderBuilder::default().build();
        loop {
            let data: Vec<u8> = match &mut self.conn {
                Conn::Udp(socket) => {
                    let mut buffer = vec![0u8; 2048];
                    let n = socket.recv(&mut buffer).await.map_err(unreachable)?;
                    buffer.truncate(n);
                    buffer
                }
                Conn::Tcp(stream) => read_framed(stream, &mut self.buffer).await?,
                Conn::Tls(stream) => read_framed(stream.as_mut(), &mut self.buffer).await?,
            };
            if let Ok((message, _)) = decoder.decode(&data) {
                return Ok(message);
            }
        }
    }
}

/// Reads one STUN message from a stream (its 20-byte header says how long it is).
async fn read_framed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
) -> Result<Vec<u8>, ProbeOutcome> {
    buffer.resize(20, 0);
    stream
        .read_exact(&mut buffer[..20])
        .await
        .map_err(|e| unreachable(format!("the connection closed: {e}")))?;
    let length = u16::from_be_bytes([buffer[2], buffer[3]]) as usize;
    if 20 + length > MAX_MESSAGE {
        return Err(ProbeOutcome::Failed(format!(
            "a {length}-byte STUN message is too long"
        )));
    }
    buffer.resize(20 + length, 0);
    stream
        .read_exact(&mut buffer[20..])
        .await
        .map_err(|e| unreachable(format!("the connection closed: {e}")))?;
    Ok(std::mem::take(buffer))
}

fn encode(message: &StunMessage) -> Result<Vec<u8>, ProbeOutcome> {
    let mut out = vec![0u8; 1500];
    let size = MessageEncoderBuilder::default()
        .build()
        .encode(&mut out, message)
        .map_err(|e| ProbeOutcome::Failed(format!("cannot encode the request: {e}")))?;
    out.truncate(size);
    Ok(out)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks the certificate against the trust anchors, notes the verdict and lets the handshake
/// go on, so the STUN checks still run over an untrusted certificate and the report says both.
#[derive(Debug)]
struct Recording {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    verdict: Mutex<Option<Result<(), String>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Recording {
    fn new(roots: Option<&Roots>) -> Result<Self, ProbeOutcome> {
        let provider = provider();
        let webpki = match roots {
            Some(roots) if !roots.is_empty() => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .map_err(|e| ProbeOutcome::Failed(format!("TLS trust anchors: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            webpki,
            verdict: Mutex::new(None),
            provider,
        })
    }

    fn verdict(&self) -> Result<(), String> {
        self.verdict
            .lock()
            .ok()
            .and_then(|v| v.clone())
            .unwrap_or_else(|| Err("no certificate was checked".into()))
    }
}

impl rustls::client::danger::ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verdict = match &self.webpki {
            Some(webpki) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Err("this machine has no trust anchors to check it against".into()),
        };
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn describe_certificate(der: &[u8], trust: Result<(), String>) -> Certificate {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Certificate {
            names: Vec::new(),
            not_after: 0,
            trust: Err("the certificate cannot be read".into()),
        };
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
                    ),
                    16 => {
                        let mut octets = [0u8; 16];
                        octets.copy_from_slice(bytes);
                        names.push(std::net::Ipv6Addr::from(octets).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    Certificate {
        names,
        not_after: cert.validity().not_after.timestamp(),
        trust,
    }
}

/// What an allocation showed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Allocation {
    pub realm: String,
    /// The relayed transport address coturn gave (where peers send to reach this client).
    pub relayed: Option<SocketAddr>,
    /// This client's address as coturn saw it.
    pub mapped: Option<SocketAddr>,
}

/// Long-term credentials for one allocation.
pub(crate) struct Auth {
    username: String,
    password: String,
    realm: String,
    nonce: String,
}

impl Auth {
    /// USERNAME, REALM, NONCE and MESSAGE-INTEGRITY, in that order.
    fn attributes(&self) -> Result<Vec<StunAttribute>, ProbeOutcome> {
        let bad =
            |e: stun_rs::StunError| ProbeOutcome::Failed(format!("cannot build the request: {e}"));
        let username = UserName::new(&self.username).map_err(bad)?;
        let realm = Realm::new(&self.realm).map_err(bad)?;
        let nonce = Nonce::new(&self.nonce).map_err(bad)?;
        let key = HMACKey::new_long_term(
            &username,
            &realm,
            &self.password,
            Algorithm::from(AlgorithmId::MD5),
        )
        .map_err(bad)?;
        Ok(vec![
            username.into(),
            realm.into(),
            nonce.into(),
            MessageIntegrity::new(key).into(),
        ])
    }

    fn sign(&self, mut builder: StunMessageBuilder) -> Result<StunMessage, ProbeOutcome> {
        for attribute in self.attributes()? {
            builder = builder.with_attribute(attribute);
        }
        Ok(builder.build())
    }
}

/// The address coturn sees this client at (a STUN binding).
pub(crate) async fn binding(client: &mut Client) -> Result<Option<SocketAddr>, ProbeOutcome> {
    let answer = client
        .transact(&StunMessageBuilder::new(BINDING, MessageClass::Request).build())
        .await?;
    if answer.class() != MessageClass::SuccessResponse {
        return Err(ProbeOutcome::Failed(
            "the STUN binding request was refused".into(),
        ));
    }
    Ok(mapped(&answer))
}

fn mapped(message: &StunMessage) -> Option<SocketAddr> {
    Some(
        *message
            .get::<XorMappedAddress>()?
            .as_xor_mapped_address()
            .ok()?
            .socket_address(),
    )
}

/// Allocates a relay with credentials minted from `secret` that live `ttl` seconds (which
/// proves the shared secret); returns the allocation and the credentials to go on with.
pub(crate) async fn allocate(
    client: &mut Client,
    secret: &SecretString,
    ttl: u64,
) -> Result<(Allocation, Auth), ProbeOutcome> {
    let credential = credentials::mint(secret, "hypha-rtc-probe", ttl, crate::auth::now_secs());
    let request = || {
        StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
            .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
    };
    let challenge = client.transact(&request().build()).await?;
    let (realm, nonce) = match (challenge.class(), realm_and_nonce(&challenge)) {
        (MessageClass::ErrorResponse, Some(found)) => found,
        (MessageClass::SuccessResponse, _) => {
            return Err(ProbeOutcome::Failed(
                "coturn allocated without authentication: it is not configured with use-auth-secret".into(),
            ));
        }
        _ => {
            return Err(ProbeOutcome::Failed(
                "the allocate challenge had no realm and nonce".into(),
            ));
        }
    };
    let auth = Auth {
        username: credential.username.clone(),
        password: credential.credential.expose_secret().to_string(),
        realm,
        nonce,
    };
    let allocated = client.transact(&auth.sign(request())?).await?;
    match (allocated.class(), error_code(&allocated)) {
        (MessageClass::SuccessResponse, _) => {}
        (_, Some(401)) => return Err(ProbeOutcome::SecretRejected),
        (_, Some(code)) => {
            return Err(ProbeOutcome::Failed(format!(
                "the allocation was refused with error {code}"
            )));
        }
        (_, None) => return Err(ProbeOutcome::Failed("the allocation was refused".into())),
    }
    let relayed = allocated
        .get::<XorRelayedAddress>()
        .and_then(|a| a.as_xor_relayed_address().ok())
        .map(|a| *a.socket_address());
    Ok((
        Allocation {
            realm: auth.realm.clone(),
            relayed,
            mapped: mapped(&allocated),
        },
        auth,
    ))
}

/// Lets `peer` send to the allocation; `Err` with coturn's refusal in words.
pub(crate) async fn permit(
    client: &mut Client,
    auth: &Auth,
    peer: SocketAddr,
) -> Result<(), ProbeOutcome> {
    let request = StunMessageBuilder::new(CREATE_PERMMISSION, MessageClass::Request)
        .with_attribute(XorPeerAddress::from(peer));
    let answer = client.transact(&auth.sign(request)?).await?;
    match (answer.class(), error_code(&answer)) {
        (MessageClass::SuccessResponse, _) => Ok(()),
        (_, Some(403)) => Err(ProbeOutcome::Failed(format!(
            "coturn refuses to relay to {} (403 Forbidden: its denied-peer-ip or no-loopback-peers)",
            peer.ip()
        ))),
        (_, code) => Err(ProbeOutcome::Failed(format!(
            "CreatePermission failed with error {code:?}"
        ))),
    }
}

/// The data of the next Data indication, if one comes within `wait`.
pub(crate) async fn relayed_data(
    client: &mut Client,
    wait: Duration,
) -> Option<(SocketAddr, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, client.receive())
            .await
            .ok()?
            .ok()?;
        if message.method() == DATA && message.class() == MessageClass::Indication {
            let from = *message
                .get::<XorPeerAddress>()?
                .as_xor_peer_address()
                .ok()?
                .socket_address();
            let data = message.get::<Data>()?.as_data().ok()?.as_ref().to_vec();
            return Some((from, data));
        }
    }
}

/// Sends `data` to `peer` through the relay (a Send indication).
pub(crate) async fn send_through(
    client: &mut Client,
    peer: SocketAddr,
    data: &[u8],
) -> Result<(), ProbeOutcome> {
    let message = StunMessageBuilder::new(SEND, MessageClass::Indication)
        .with_attribute(XorPeerAddress::from(peer))
        .with_attribute(Data::new(data))
        .build();
    client.indicate(&message).await
}

/// Frees the allocation (a Refresh with lifetime 0); failures only logged.
pub(crate) async fn release(client: &mut Client, auth: &Auth) {
    let request =
        StunMessageBuilder::new(REFRESH, MessageClass::Request).with_attribute(LifeTime::new(0));
    match auth.sign(request) {
        Ok(message) => match client.transact(&message).await {
            Ok(answer) if answer.class() == MessageClass::SuccessResponse => {}
            Ok(answer) => {
                tracing::debug!(code = ?error_code(&answer), "coturn refused to free an allocation")
            }
            Err(e) => tracing::debug!(error = ?e, "coturn did not answer the refresh"),
        },
        Err(e) => tracing::debug!(error = ?e, "cannot build the refresh"),
    }
}

fn realm_and_nonce(message: &StunMessage) -> Option<(String, String)> {
    let realm = message
        .get::<Realm>()?
        .as_realm()
        .ok()?
        .as_str()
        .to_string();
    let nonce = message
        .get::<Nonce>()?
        .as_nonce()
        .ok()?
        .as_str()
        .to_string();
    Some((realm, nonce))
}

fn error_code(message: &StunMessage) -> Option<u16> {
    Some(
        message
            .get::<ErrorCode>()?
            .as_error_code()
            .ok()?
            .error_code()
            .error_code(),
    )
}
