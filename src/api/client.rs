//! The HTTP client of the local API that the CLI (and tests) use.

use std::time::Duration;

use serde_json::Value;

/// The client the CLI uses.
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer <token>` with every API request.
    token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the riftmesh agent at {addr}: {reason} (is it running? point --api or RIFTMESH_API at it)")]
    Unreachable { addr: String, reason: String },
    #[error("the agent refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    /// Something answers at the address, but not the agent's API.
    #[error("{addr} is not a riftmesh agent's API: {detail}")]
    NotApi { addr: String, detail: String },
    /// A local file the client was to send.
    #[error("{0}")]
    Local(String),
}

impl Client {
    pub fn new(api: &str) -> Self {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.trim_end_matches('/').to_string()
        } else {
            format!("http://{api}")
        };
        Client {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap_or_default(),
            token: None,
        }
    }

    /// Send `token` with every request (an API that is not on loopback, or
    /// has `api_token_file`, refuses requests without it).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// A request to the API at `path`, with the token if there is one.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => return Err(self.not_api(status).await),
        };
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_string();
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// The error for an answer that is not JSON: says so, and whether the
    /// address is the agent's metrics port (a common mix-up).
    async fn not_api(&self, status: reqwest::StatusCode) -> ClientError {
        let metrics = async {
            let r = self
                .http
                .get(format!("{}/metrics", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let text = r.text().await.ok()?;
            text.contains("riftmesh_").then_some(())
        }
        .await;
        let detail = match metrics {
            Some(()) => format!(
                "that is the agent's Prometheus metrics port; the API is on another port (the agent's --api or `api` setting, {} by default)",
                crate::config::DEFAULT_API
            ),
            None => format!(
                "it answered HTTP {status} without a JSON body (the API is at the agent's --api or `api` setting, {} by default)",
                crate::config::DEFAULT_API
            ),
        };
        ClientError::NotApi {
            addr: self.base.clone(),
            detail,
        }
    }

    /// Upload a file's bytes (read with the caller's permissions) as a
    /// blob: `POST /v1/blobs/upload`, streamed, with its length.
    pub async fn upload_blob(
        &self,
        file: &std::path::Path,
        name: &str,
        event: Option<&str>,
        link: &crate::blob::NamingLink,
    ) -> Result<Value, ClientError> {
        self.upload_blob_with(file, name, event, link, |_, _| {})
            .await
    }

    /// [`Client::upload_blob`], calling `sent(bytes_sent, file_size)` as
    /// the file's bytes go out (for a progress display).
    pub async fn upload_blob_with(
        &self,
        file: &std::path::Path,
        name: &str,
        event: Option<&str>,
        link: &crate::blob::NamingLink,
        sent: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        let local = |e: std::io::Error| ClientError::Local(format!("{}: {e}", file.display()));
        // O_NONBLOCK: a FIFO's open would wait for a writer; the type is
        // checked on the descriptor (regular files ignore the flag).
        let f = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_NONBLOCK,
        )
        .open(file)
        .map_err(local)?;
        let md = f.metadata().map_err(local)?;
        let f = tokio::fs::File::from_std(f);
        if !md.is_file() {
            return Err(ClientError::Local(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        let mut query = vec![("name", name)];
        if let Some(e) = event {
            query.push(("event", e));
        }
        for (k, v) in [
            ("source", &link.source),
            ("correlation_id", &link.correlation_id),
            ("parent_id", &link.parent_id),
        ] {
            if let Some(v) = v {
                query.push((k, v));
            }
        }
        let (size, mut done) = (md.len(), 0u64);
        let body = reqwest::Body::wrap_stream(futures::StreamExt::inspect(
            tokio_util::io::ReaderStream::with_capacity(f, 1 << 20),
            move |chunk| {
                if let Ok(c) = chunk {
                    done += c.len() as u64;
                    sent(done, size);
                }
            },
        ));
        self.send(
            self.request(reqwest::Method::POST, "/v1/blobs/upload")
                .query(&query)
                .header(reqwest::header::CONTENT_LENGTH, md.len())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                // Sending and hashing a large model takes longer than the
                // client's usual 120 s.
                .timeout(Duration::from_secs(6 * 3600))
                .body(body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn get_query(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, path).query(query))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// Stream a GET answer into `out` atomically (temporary file, fsync,
    /// rename). Returns the bytes written.
    pub async fn download(
        &self,
        path: &str,
        query: &[(&str, String)],
        out: &std::path::Path,
    ) -> Result<u64, ClientError> {
        self.download_with(path, query, out, |_, _| {}).await
    }

    /// [`Client::download`], calling `got(bytes_written, content_length)`
    /// as the answer arrives (a length of 0: not announced).
    pub async fn download_with(
        &self,
        path: &str,
        query: &[(&str, String)],
        out: &std::path::Path,
        mut got: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let mut resp = self
            .request(reqwest::Method::GET, path)
            .query(query)
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: self.base.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message: body["error"].as_str().unwrap_or("no message").to_string(),
            });
        }
        let local = |e: std::io::Error| ClientError::Protocol(format!("{}: {e}", out.display()));
        // The blob id the agent served: the whole content is checked
        // against it before the file is renamed into place.
        let expect = resp
            .headers()
            .get("x-riftmesh-blob")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let mut id = [0u8; 32];
                hex::decode_to_slice(v, &mut id).ok().map(|_| id)
            });
        let length = resp.content_length().unwrap_or(0);
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let tmp = out.with_file_name(format!(
            ".{}.riftmesh-get",
            out.file_name()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        ));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(local)?;
        let mut n = 0u64;
        let res = async {
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                f.write_all(&chunk).await.map_err(local)?;
                sha2::Digest::update(&mut hasher, &chunk);
                n += chunk.len() as u64;
                got(n, length);
            }
            // Fail closed: an answer that doesn't name its blob is not
            // written (the agent always names it).
            let id = expect.ok_or_else(|| {
                ClientError::Protocol(
                    "the agent did not name the blob it sent (x-riftmesh-blob): not written".into(),
                )
            })?;
            {
                let got: [u8; 32] = sha2::Digest::finalize(hasher).into();
                if got != id {
                    return Err(ClientError::Protocol(format!(
                        "the content's SHA-256 is {}, not the blob id {}: not written",
                        hex::encode(got),
                        hex::encode(id)
                    )));
                }
            }
            f.sync_all().await.map_err(local)?;
            tokio::fs::rename(&tmp, out).await.map_err(local)
        }
        .await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        res.map(|_| n)
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::PUT, path).json(body))
            .await
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
}
