//! bulkhead's gRPC protocol and a client connector for its Unix socket.
//!
//! The `.proto` lives in `proto/bulkhead.proto` and is compiled by protox (no `protoc`).
//! Protocol types stop here: the daemon converts them into core commands.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

pub use v1::bulkhead_client::BulkheadClient;
pub use v1::bulkhead_server::{Bulkhead, BulkheadServer};

/// Connects to a daemon's Unix socket. Fails at once (no retry loop) when nothing listens.
pub async fn connect(socket: &Path) -> Result<BulkheadClient<Channel>, tonic::transport::Error> {
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
    Ok(BulkheadClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}
