//! The small HTTP/1.x endpoints netleash serves: the agent's `GET /metrics`
//! and the sidecar's `GET /healthz`. One request per connection, answered
//! with HTTP/1.0 and `Connection: close`, so no keep-alive state is kept.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head read; a longer one is read no further and
/// answered from what was read (only the request line is looked at).
pub const MAX_REQUEST_HEAD: usize = 8192;

/// Accepts connections on `listener` and answers each in its own task with
/// `answer`, until the task serving is dropped.
pub async fn serve<Answer, Answering>(listener: TcpListener, answer: Answer)
where
    Answer: Fn(TcpStream) -> Answering,
    Answering: Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            // accept(2) fails on a full file table (EMFILE, ENFILE) and on
            // connections aborted before they were accepted; wait instead of
            // spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(answer(stream));
    }
}

/// Reads a request head: up to the blank line that ends it (RFC 9112,
/// section 2.1) or [`MAX_REQUEST_HEAD`] bytes. `None` when the client
/// closes, fails, or takes longer than `timeout`: then nothing is answered.
pub async fn read_request_head(stream: &mut TcpStream, timeout: Duration) -> Option<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(timeout, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(length) => head.extend_from_slice(&buffer[..length]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return None;
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The method and the request target of a request head's request line
/// (RFC 9112, section 3), where present.
pub fn method_and_path(head: &str) -> (Option<&str>, Option<&str>) {
    let mut words = head.split_whitespace();
    (words.next(), words.next())
}

/// Writes a whole HTTP/1.0 response and closes the connection. Errors are
/// ignored: the client has gone, and there is nobody left to tell.
pub async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_gives_method_and_path() {
        assert_eq!(
            method_and_path("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            (Some("GET"), Some("/metrics"))
        );
        assert_eq!(method_and_path("GET"), (Some("GET"), None));
        assert_eq!(method_and_path(""), (None, None));
    }
}
