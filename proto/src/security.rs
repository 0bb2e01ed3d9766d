//! Who may talk to a coordinator: a join token on every RPC and TLS (optionally mutual) on
//! the connection. The coordinator checks ([`ServerSecurity`]); every client — workers,
//! `scale`, `checkpoint`, `status` — presents ([`ClientSecurity`]). One module for both
//! sides, so they agree on the header, the loader and the error messages.
//!
//! A token never appears on a command line (where `ps` shows it) or in a log: it comes
//! from a file or from `MOXIN_TOKEN`, and its `Debug` is redacted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::v1::coordinator_client::CoordinatorClient;

/// The environment variable a token may come from (when no token file is given).
pub const TOKEN_ENV: &str = "MOXIN_TOKEN";
/// Shorter tokens are refused: they can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;
const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";

/// Why security material could not be loaded or a secured connection made.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A token, certificate or key file is unreadable or invalid.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// Options that do not fit together, or an invalid token.
    #[error("{0}")]
    Invalid(String),
    /// The connection could not be made (address, TLS handshake, refused).
    #[error("cannot connect to the coordinator at {url}: {message}")]
    Connect {
        /// The coordinator URL.
        url: String,
        /// Every cause, outermost first.
        message: String,
        /// A TLS verification failure (a wrong CA, an expired or refused certificate): it
        /// will not go away by retrying.
        permanent: bool,
    },
}

/// The shared secret every RPC must carry when the coordinator has one.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(Arc<str>);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl JoinToken {
    /// A token from its text (surrounding whitespace ignored): at least
    /// [`MIN_TOKEN_LEN`] printable ASCII characters, no spaces.
    pub fn new(text: &str) -> Result<Self, SecurityError> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(SecurityError::Invalid(format!(
                "the join token has {} characters; use at least {MIN_TOKEN_LEN} random ones \
                 (e.g. `openssl rand -hex 32 > token`)",
                t.len()
            )));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecurityError::Invalid(
                "the join token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)".into(),
            ));
        }
        Ok(JoinToken(t.into()))
    }

    /// The token in `path` (a Kubernetes Secret file, a file only its owner can read).
    pub fn from_file(path: &Path) -> Result<Self, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| SecurityError::File {
            path: path.into(),
            message: format!("cannot read the join token: {e}"),
        })?;
        Self::new(&text).map_err(|e| SecurityError::File { path: path.into(), message: e.to_string() })
    }

    /// The token from `file` if given, else from `MOXIN_TOKEN`; `None` when neither is set.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, SecurityError> {
        if let Some(path) = file {
            return Self::from_file(path).map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(text) if !text.trim().is_empty() => {
                Self::new(&text).map(Some).map_err(|e| SecurityError::Invalid(format!("{TOKEN_ENV}: {e}")))
            }
            _ => Ok(None),
        }
    }

    /// 32 random bytes from the OS, hex-encoded.
    pub fn generate() -> Result<Self, SecurityError> {
        let bytes = random_key()?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(JoinToken(hex.into()))
    }

    /// Writes the token to `path`, readable only by its owner.
    pub fn write_private(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(path)?;
        file.write_all(self.0.as_bytes())
    }

    /// The secret itself, for a child process's environment (never for a log).
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// Equal in time independent of where the first difference is.
    fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

/// Whether `a == b`, in time independent of where they first differ (secrets, MACs).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 bytes from the OS's cryptographic random source (tokens, a generation's group key).
pub fn random_key() -> Result<[u8; 32], SecurityError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| SecurityError::Invalid(format!("the OS random source failed: {e}")))?;
    Ok(bytes)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, SecurityError> {
    let bytes = std::fs::read(path)
        .map_err(|e| SecurityError::File { path: path.into(), message: format!("cannot read the {what}: {e}") })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") {
        return Err(SecurityError::File { path: path.into(), message: format!("the {what} is not in PEM format") });
    }
    // A key where a certificate belongs (or the reverse) is otherwise taken as an empty
    // list of certificates and only fails later, as a certificate nobody signed.
    if what.contains("certificate") && !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(SecurityError::File {
            path: path.into(),
            message: format!("the {what} has no CERTIFICATE block (a key?)"),
        });
    }
    Ok(bytes)
}

/// The certificate and key (PEM) a side presents, when given; both or neither.
fn identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Identity>, SecurityError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            Ok(Some(Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS private key")?)))
        }
        (None, None) => Ok(None),
        _ => Err(SecurityError::Invalid("--tls-cert and --tls-key go together; give both".into())),
    }
}

/// What the coordinator requires of its peers.
#[derive(Clone, Debug, Default)]
pub struct ServerSecurity {
    token: Option<JoinToken>,
    tls: Option<ServerTlsConfig>,
    mutual: bool,
}

impl ServerSecurity {
    /// Requirements from the coordinator's options: a token (see [`JoinToken::load`]), a
    /// certificate and key (PEM) for TLS, and a CA (PEM) whose certificates clients must
    /// present (mutual TLS).
    pub fn load(
        token: Option<JoinToken>,
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Self, SecurityError> {
        let tls = match identity(cert, key)? {
            Some(identity) => {
                // Built now, before the run directory is touched, the identity alone and then
                // with the client CA, so that what TLS cannot use is named.
                let build = |tls: &ServerTlsConfig| Server::builder().tls_config(tls.clone()).map(|_| ());
                let mut tls = ServerTlsConfig::new().identity(identity);
                build(&tls).map_err(|e| unusable_pair("the coordinator's ", cert, key, &chain(&e)))?;
                if let Some(ca) = client_ca {
                    tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA certificate")?));
                    build(&tls).map_err(|e| unusable_ca("--tls-client-ca", ca, &chain(&e)))?;
                }
                Some(tls)
            }
            None if client_ca.is_some() => {
                return Err(SecurityError::Invalid(
                    "--tls-client-ca (mutual TLS) needs the coordinator's own --tls-cert and --tls-key".into(),
                ))
            }
            None => None,
        };
        Ok(ServerSecurity { token, tls, mutual: client_ca.is_some() })
    }

    /// The URL scheme clients use: `https` with TLS.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `builder` serving TLS when configured.
    pub fn apply(&self, builder: Server) -> Result<Server, SecurityError> {
        match &self.tls {
            Some(tls) => builder
                .tls_config(tls.clone())
                .map_err(|e| SecurityError::Invalid(format!("TLS configuration: {}", chain(&e)))),
            None => Ok(builder),
        }
    }

    /// The per-RPC check of the join token (passes everything when there is none).
    pub fn token_check(&self) -> TokenCheck {
        TokenCheck { token: self.token.clone(), refused: Arc::new(Mutex::new(Refusals::default())) }
    }

    /// A warning when `addr` is reachable from other machines while the coordinator admits
    /// anyone there: no token, or no TLS (the token would cross the network in the clear).
    pub fn exposure_warning(&self, addr: std::net::SocketAddr) -> Option<String> {
        if addr.ip().is_loopback() {
            return None;
        }
        let missing = match (&self.token, &self.tls, self.mutual) {
            (None, None, _) => {
                "neither TLS nor a join token: anyone who can reach this port can join the job or stop it"
            }
            (None, Some(_), false) => {
                "TLS but no join token: anyone who can reach this port can join the job or stop it"
            }
            (Some(_), None, _) => {
                "a join token but no TLS: the token and the job's traffic cross the network in the clear"
            }
            _ => return None,
        };
        Some(format!(
            "the coordinator listens on {addr} with {missing}; set --token-file (or {TOKEN_ENV}) and --tls-cert/--tls-key \
             (see README, \"Security\"), or listen on 127.0.0.1"
        ))
    }
}

#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// Refuses RPCs without the coordinator's join token with `Unauthenticated`, and logs the
/// refusal (the peer's address, never what it sent) at most once a second.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<JoinToken>,
    refused: Arc<Mutex<Refusals>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else { return Ok(request) };
        let presented = request.metadata().get(HEADER).and_then(|v| v.as_bytes().strip_prefix(SCHEME.as_bytes()));
        let why = match presented {
            Some(p) if token.matches(p) => return Ok(request),
            Some(_) => "a wrong join token",
            None => "no join token",
        };
        if let Ok(mut r) = self.refused.lock() {
            if r.last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                let peer = request.remote_addr().map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
                let also = if r.unlogged > 0 {
                    format!(" ({} more refused since the last message)", r.unlogged)
                } else {
                    String::new()
                };
                tracing::warn!("refused an RPC from {peer}: {why}{also}");
                r.last_logged = Some(Instant::now());
                r.unlogged = 0;
            } else {
                r.unlogged += 1;
            }
        }
        Err(Status::unauthenticated(format!(
            "{why}: this coordinator requires the job's join token (give it with --token-file or {TOKEN_ENV})"
        )))
    }
}

/// Adds the join token to every request.
#[derive(Clone)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(HEADER, value.clone());
        }
        Ok(request)
    }
}

/// A coordinator client that presents the join token on every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// What a client presents to the coordinator.
#[derive(Clone, Debug, Default)]
pub struct ClientSecurity {
    token: Option<JoinToken>,
    tls: Option<ClientTlsConfig>,
    /// The files behind `tls` (`--tls-ca`, `--tls-cert`), named in what a failure says.
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
}

impl ClientSecurity {
    /// From a client's options: a token, the CA (PEM) that signed the coordinator's
    /// certificate, and this client's own certificate and key (PEM) for mutual TLS.
    pub fn load(
        token: Option<JoinToken>,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, SecurityError> {
        let identity = identity(cert, key)?;
        let tls = if ca.is_some() || identity.is_some() {
            let Some(ca) = ca else {
                return Err(SecurityError::Invalid(
                    "a client certificate needs --tls-ca (the CA that signed the coordinator's certificate)".into(),
                ));
            };
            // Built now (it is built again per connection), the CA alone and then with the
            // identity, so that what TLS cannot use is named before the first try rather
            // than reported as an unreachable coordinator.
            let build = |tls: &ClientTlsConfig| Channel::from_static("https://localhost").tls_config(tls.clone());
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            build(&tls).map_err(|e| unusable_ca("--tls-ca", ca, &chain(&e)))?;
            if let Some(identity) = identity {
                tls = tls.identity(identity);
                build(&tls).map_err(|e| unusable_pair("", cert, key, &chain(&e)))?;
            }
            Some(tls)
        } else {
            None
        };
        Ok(ClientSecurity { token, tls, ca: ca.map(Path::to_path_buf), cert: cert.map(Path::to_path_buf) })
    }

    /// Only a token (e.g. the one `launch` made for its own workers).
    pub fn with_token(token: Option<JoinToken>) -> Self {
        ClientSecurity { token, tls: None, ca: None, cert: None }
    }

    /// True when a token is presented.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Connects to the coordinator at `url` (`https://` exactly when TLS is configured).
    pub async fn connect(&self, url: &str) -> Result<Client, SecurityError> {
        let connect_error =
            |message: String, permanent: bool| SecurityError::Connect { url: url.into(), message, permanent };
        let https = url.starts_with("https://");
        match (&self.tls, https) {
            (Some(_), false) => {
                return Err(SecurityError::Invalid(format!(
                    "{url}: TLS options are given but the URL is not https://; use https://{}",
                    url.trim_start_matches("http://")
                )))
            }
            (None, true) => {
                return Err(SecurityError::Invalid(format!(
                    "{url}: an https:// coordinator needs --tls-ca (the CA that signed its certificate)"
                )))
            }
            _ => {}
        }
        let mut endpoint =
            Channel::from_shared(url.to_string()).map_err(|e| SecurityError::Invalid(format!("{url}: {e}")))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| connect_error(chain(&e), true))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let message = chain(&e);
            match is_tls_verification(&message) {
                true => {
                    let hint = verification_hint(&message, self.ca.as_deref(), self.cert.as_deref());
                    connect_error(format!("{message}; {hint}"), true)
                }
                false => connect_error(message, false),
            }
        })?;
        let value = match &self.token {
            Some(t) => Some(
                format!("{SCHEME}{}", t.reveal())
                    .parse()
                    .map_err(|_| SecurityError::Invalid("the join token is not a valid header value".into()))?,
            ),
            None => None,
        };
        Ok(CoordinatorClient::with_interceptor(channel, AttachToken(value)))
    }
}

/// True when an error message is a TLS verification failure (bad/expired certificate,
/// unknown CA, or the server refusing ours), which retrying cannot fix.
pub fn is_tls_verification(message: &str) -> bool {
    // rustls' wording: our check of the peer's certificate failed, or the peer's of ours.
    ["invalid peer certificate", "received fatal alert"].iter().any(|m| message.contains(m))
}

/// A certificate and key that TLS cannot use together (usually a key that is not the
/// certificate's own), naming both files.
fn unusable_pair(whose: &str, cert: Option<&Path>, key: Option<&Path>, cause: &str) -> SecurityError {
    let name = |p: Option<&Path>| p.map_or_else(|| "(none)".to_string(), |p| p.display().to_string());
    let why = if cause.contains("KeyMismatch") || cause.contains("keys may not be consistent") {
        "the key does not belong to the certificate; give the key the certificate was issued for"
    } else {
        "TLS cannot use them"
    };
    SecurityError::Invalid(format!("{whose}--tls-cert {} and --tls-key {}: {why} ({cause})", name(cert), name(key)))
}

/// A CA file TLS cannot use (not a certificate, or one rustls refuses), named.
fn unusable_ca(flag: &str, ca: &Path, cause: &str) -> SecurityError {
    SecurityError::File {
        path: ca.to_path_buf(),
        message: format!("{flag}: TLS cannot use this as a CA certificate ({cause}); give the CA's certificate (PEM)"),
    }
}

/// What to do about a failed certificate check (rustls' reason in `message`): `ca` is the
/// CA the worker checks the coordinator against, `cert` the worker's own certificate.
fn verification_hint(message: &str, ca: Option<&Path>, cert: Option<&Path>) -> String {
    let ca = ca.map_or_else(|| "--tls-ca".to_string(), |p| format!("--tls-ca {}", p.display()));
    let own = cert.map_or_else(|| "its certificate".to_string(), |p| format!("--tls-cert {}", p.display()));
    if message.contains("received fatal alert") {
        if cert.is_none() {
            return "the coordinator requires a client certificate (mutual TLS): pass --tls-cert and --tls-key, \
                    signed by the CA it trusts (--tls-client-ca there)"
                .into();
        }
        return format!(
            "the coordinator refused this worker's certificate: {own} must be signed by the CA the coordinator \
             trusts (--tls-client-ca there), be an X.509 v3 certificate and not be expired"
        );
    }
    if message.contains("UnknownIssuer") || message.contains("BadSignature") {
        return format!("the coordinator's certificate is not signed by the CA in {ca}; give the CA that signed it");
    }
    // rustls' Debug names (NotValidForName) or its Display texts ("certificate not valid
    // for name"), whichever the error chain carries.
    if message.contains("NotValidForName") || message.contains("not valid for name") {
        return "the coordinator's certificate does not list the host in the URL (subjectAltName); connect by a \
                name or address the certificate lists"
            .into();
    }
    if ["Expired", "NotValidYet", "certificate expired", "not valid yet"].iter().any(|m| message.contains(m)) {
        return "a certificate is outside its validity period (expired, or not valid yet: check both machines' \
                clocks)"
            .into();
    }
    if message.contains("UnsupportedCertVersion") {
        return format!(
            "a certificate is X.509 v1; TLS needs v3 (with a subjectAltName extension): check {own} and the \
             coordinator's, e.g. sign with `openssl x509 -req ... -extfile` naming subjectAltName"
        );
    }
    format!("check that {ca} signed the coordinator's certificate and that {own} is signed by the CA it trusts")
}

/// An error and its causes, outermost first ("transport error: …: invalid peer certificate").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_get_the_hint_for_their_cause() {
        let (ca, cert) = (Some(Path::new("ca.pem")), Some(Path::new("worker.pem")));
        let hint = |m: &str, cert| verification_hint(m, ca, cert);
        // rustls 0.23's Display texts and Debug names.
        let name = "invalid peer certificate: certificate not valid for name \"db\"; certificate is only valid for ..";
        assert!(hint(name, cert).contains("does not list the host"), "{}", hint(name, cert));
        assert!(hint("invalid peer certificate: NotValidForName", cert).contains("does not list the host"));
        for m in [
            "invalid peer certificate: certificate expired: ..",
            "invalid peer certificate: certificate not valid yet: ..",
        ] {
            assert!(hint(m, cert).contains("validity period"), "{}", hint(m, cert));
        }
        assert!(hint("invalid peer certificate: UnknownIssuer", cert).contains("--tls-ca ca.pem"));
        let alert = "received fatal alert: UnknownCA";
        assert!(hint(alert, cert).contains("--tls-cert worker.pem must be signed"), "{}", hint(alert, cert));
        assert!(hint(alert, None).contains("requires a client certificate"), "{}", hint(alert, None));
    }

    #[test]
    fn tokens_are_validated_and_never_printed() {
        assert!(JoinToken::new("short").unwrap_err().to_string().contains("at least 16"));
        assert!(JoinToken::new("has a space in it ok").unwrap_err().to_string().contains("without spaces"));
        let t = JoinToken::new("  0123456789abcdef0123\n").unwrap();
        assert_eq!(t.reveal(), "0123456789abcdef0123");
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef0124"));
        assert!(!t.matches(b"0123456789abcdef012"));
        let g = JoinToken::generate().unwrap();
        assert_eq!(g.reveal().len(), 64);
        assert_ne!(g, JoinToken::generate().unwrap());
    }

    #[test]
    fn token_files_say_which_file_is_wrong() {
        let dir = std::env::temp_dir().join(format!("moxin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = JoinToken::from_file(&dir.join("absent")).unwrap_err().to_string();
        assert!(missing.contains("absent") && missing.contains("cannot read"), "{missing}");
        let weak = dir.join("weak");
        std::fs::write(&weak, "abc\n").unwrap();
        let e = JoinToken::from_file(&weak).unwrap_err().to_string();
        assert!(e.contains("weak") && e.contains("at least 16"), "{e}");
        let good = dir.join("good");
        let t = JoinToken::generate().unwrap();
        t.write_private(&good).unwrap();
        assert_eq!(JoinToken::from_file(&good).unwrap(), t);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&good).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_options_must_fit_together() {
        let e = ServerSecurity::load(None, Some(Path::new("c.pem")), None, None).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        let e = ServerSecurity::load(None, None, None, Some(Path::new("ca.pem"))).unwrap_err().to_string();
        assert!(e.contains("mutual TLS"), "{e}");
        let e = ServerSecurity::load(None, Some(Path::new("/nonexistent/c.pem")), Some(Path::new("k.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.pem") && e.contains("TLS certificate"), "{e}");
        let e = ClientSecurity::load(None, None, Some(Path::new("c")), Some(Path::new("k"))).unwrap_err().to_string();
        assert!(e.contains("--tls-ca") || e.contains("cannot read"), "{e}");
    }

    #[test]
    fn exposure_is_warned_about_off_loopback_only() {
        let open = ServerSecurity::default();
        assert!(open.exposure_warning("127.0.0.1:5".parse().unwrap()).is_none());
        let w = open.exposure_warning("0.0.0.0:5".parse().unwrap()).unwrap();
        assert!(w.contains("neither TLS nor a join token") && w.contains("--token-file"), "{w}");
        let token_only = ServerSecurity { token: Some(JoinToken::generate().unwrap()), ..Default::default() };
        assert!(token_only.exposure_warning("10.0.0.1:5".parse().unwrap()).unwrap().contains("in the clear"));
    }

    #[test]
    fn the_check_refuses_missing_and_wrong_tokens() {
        use tonic::service::Interceptor;
        let token = JoinToken::new("0123456789abcdef").unwrap();
        let mut check = ServerSecurity { token: Some(token), ..Default::default() }.token_check();
        let mut with = |value: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = value {
                r.metadata_mut().insert(HEADER, v.parse().unwrap());
            }
            check.call(r)
        };
        assert!(with(Some("Bearer 0123456789abcdef")).is_ok());
        let wrong = with(Some("Bearer 0123456789abcdeX")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("wrong join token") && !wrong.message().contains("0123"));
        assert!(with(None).unwrap_err().message().contains("no join token"));
        assert!(with(Some("0123456789abcdef")).is_err(), "the scheme is required");
        let mut open = ServerSecurity::default().token_check();
        assert!(open.call(Request::new(())).is_ok());
    }
}
