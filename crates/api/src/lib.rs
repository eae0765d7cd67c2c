//! bulkhead's gRPC protocol and client connectors: its Unix socket ([`connect`],
//! [`connect_unix`]) and its mutual-TLS TCP listener ([`connect_tcp`]).
//!
//! The `.proto` lives in `proto/bulkhead.proto` and is compiled by protox (no `protoc`).
//! Protocol types stop here: the daemon converts them into core commands.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

/// The API's encoded `FileDescriptorSet`, which the daemon's server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead_descriptor.bin"));

pub use v1::bulkhead_client::BulkheadClient;
pub use v1::bulkhead_server::{Bulkhead, BulkheadServer};

/// Connects to a daemon's Unix socket. Fails at once (no retry loop) when nothing listens.
pub async fn connect(socket: &Path) -> Result<BulkheadClient<Channel>, tonic::transport::Error> {
    Ok(BulkheadClient::new(unix_channel(socket).await?).max_decoding_message_size(MAX_MESSAGE))
}

/// The largest response message a client accepts (log chunks, long lists).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A client that may carry a bearer token: what [`connect_unix`] and [`connect_tcp`] give.
pub type Client = BulkheadClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every request (nothing when it has no token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// `None` when the token has characters a header cannot carry.
    pub fn new(token: &str) -> Option<Bearer> {
        MetadataValue::try_from(format!("Bearer {token}"))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                Bearer(Some(v))
            })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How to reach a daemon's TCP listener: mutual TLS, and a token.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// `HOST:PORT`; HOST is also the name the server certificate must carry.
    pub addr: String,
    /// The CA that signed the server's certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// The client certificate and key (PEM); the daemon refuses a client without one.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
}

/// A TCP connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid daemon address {0:?}: expected HOST:PORT")]
    Address(String),
    #[error("the token has characters an HTTP header cannot carry")]
    Token,
    #[error("cannot connect to {addr}: {source}")]
    Transport {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to a daemon's Unix socket, as a [`Client`] (no token: the socket is trusted).
pub async fn connect_unix(socket: &Path) -> Result<Client, tonic::transport::Error> {
    Ok(
        BulkheadClient::with_interceptor(unix_channel(socket).await?, Bearer::default())
            .max_decoding_message_size(MAX_MESSAGE),
    )
}

/// Connects to a daemon's TCP listener (`bulkhead serve --listen`) with mutual TLS; every
/// request carries the token.
pub async fn connect_tcp(opts: TcpOptions) -> Result<Client, ConnectError> {
    let bearer = match &opts.token {
        Some(t) => Bearer::new(t).ok_or(ConnectError::Token)?,
        None => Bearer::default(),
    };
    let addr = opts.addr.clone();
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|_| ConnectError::Address(addr.clone()))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&opts.ca_pem));
    if let Some((cert, key)) = &opts.client_identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let transport = |source| ConnectError::Transport {
        addr: addr.clone(),
        source,
    };
    let channel = endpoint
        .tls_config(tls)
        .map_err(transport)?
        .connect()
        .await
        .map_err(transport)?;
    Ok(BulkheadClient::with_interceptor(channel, bearer).max_decoding_message_size(MAX_MESSAGE))
}

async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: the connector always dials the socket.
    let channel = Endpoint::from_static("http://bulkhead.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}
