//! The one HTTP/1.1 client of the tests: `/metrics`, `/readyz`, `/config`, `POST /json` of
//! sluice, and requests through Envoy's listener as a user would send them.
//!
//! Hand-written on purpose, and tiny: one request per connection (`Connection: close`), the
//! whole answer read until the server closes, chunked bodies decoded. The tests need to see
//! exactly what went over the wire (header names and repeats, status lines), which a full
//! client would normalise away, and a dependency would be one more thing to keep in step with
//! the server's HTTP stack. Every exchange is bounded in time; a malformed answer is an error
//! that says what was received.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long [`get`] and [`post_json`] wait for a whole answer.
pub const DEFAULT_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (any case); panics when the header appears more than once,
    /// since a test reading one value of a repeated header would check only half of it.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        let mut found = self.headers.iter().filter(|(n, _)| *n == name);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(
            found.next().is_none(),
            "header {name} appears twice: {self:?}"
        );
        first
    }

    /// Whether any header name starts with `prefix` (lower case).
    pub fn has_header_starting_with(&self, prefix: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.starts_with(prefix))
    }

    /// The body as JSON; panics showing the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One request on a fresh connection to `addr`, answered in full within `within`.
///
/// `headers` are sent as given after the request line; a `Host: <addr>` header is added unless
/// one is given. With a `body`, `Content-Length` is added (the content type, if any, is one of
/// `headers`).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    within: Duration,
) -> Result<HttpResponse, String> {
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    request.push_str("Connection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    let raw = exchange(addr, request.as_bytes(), within)
        .await
        .map_err(|e| format!("{method} {path} on {addr}: {e}"))?;
    parse_response(&raw).map_err(|e| format!("{method} {path} on {addr}: {e}"))
}

/// `GET path`, answered within [`DEFAULT_WITHIN`]; panics on any failure.
/// Writes `request` as it is (any bytes), reads until the server closes, within `within`.
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    within: Duration,
) -> Result<Vec<u8>, String> {
    let talk = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(raw)
    };
    tokio::time::timeout(within, talk)
        .await
        .map_err(|_| format!("no complete answer within {within:?}"))?
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    get_within(addr, path, DEFAULT_WITHIN).await
}

/// `GET path`, answered within `within`; panics on any failure.
pub async fn get_within(addr: SocketAddr, path: &str, within: Duration) -> HttpResponse {
    send(addr, "GET", path, &[], None, within)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `POST path` with a JSON body, answered within [`DEFAULT_WITHIN`]; panics on any failure.
pub async fn post_json(addr: SocketAddr, path: &str, body: &str) -> HttpResponse {
    send(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(body),
        DEFAULT_WITHIN,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a whole HTTP/1.x answer: status line, headers, body (de-chunked, or cut at
/// `Content-Length`).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = find(raw, b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in: {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..head_end])
        .map_err(|_| format!("headers are not text: {:?}", String::from_utf8_lossy(raw)))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .map(|line| {
            line.split_once(':')
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
                .ok_or_else(|| format!("bad header line {line:?}"))
        })
        .collect::<Result<Vec<(String, String)>, String>>()?;
    let mut body = raw[head_end + 4..].to_vec();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(length) = value("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("bad content-length {length:?}"))?;
        if body.len() < length {
            return Err(format!(
                "body shorter than content-length {length}: {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        body.truncate(length);
    }
    let body = String::from_utf8(body).map_err(|e| {
        format!(
            "body is not UTF-8: {:?}",
            String::from_utf8_lossy(e.as_bytes())
        )
    })?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Decodes a chunked body (chunk extensions ignored, trailers dropped).
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or("no chunk size line")?;
        let size_line = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|e| format!("chunk size: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("short chunk")?);
        data = data.get(size + 2..).ok_or("short chunk")?;
    }
}
