//! The agent's two listeners: the API on a root-only Unix socket (one JSON
//! request and reply per connection, see [`super::protocol`]) and the
//! Prometheus text metrics over HTTP.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::protocol::{FailureKind, MAX_MESSAGE_BYTES, Reply, Request, Response};
use super::{Agent, AgentMetrics};
use crate::http_endpoint;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the metrics endpoint waits for a request head.
const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the socket's directory {path}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another netleash agent answers on {path}; stop it first (`systemctl stop netleash-agent`) \
         or give another --socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or give another --socket")]
    NotSocket { path: PathBuf },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the API socket with mode 0600 (owner only: the API changes firewall
/// rules). A stale socket file (nobody answers on it: a crashed agent) is
/// replaced; a live one means another agent runs, and nothing is touched.
pub fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| Error::SocketDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(Error::NotSocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket file nobody answers on");
            std::fs::remove_file(path).map_err(|source| Error::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(_) => {}
    }
    let bind_error = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    // The socket file is created by bind(2) with the umask applied: 0177
    // makes it 0600 from its first instant, so no other user can connect
    // in the moment before the chmod below.
    // SAFETY: umask only swaps the process's file mode mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves API connections until the task is dropped.
pub async fn serve_api(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer_api(stream, agent.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer_api(stream: UnixStream, agent: Arc<Agent>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE_BYTES as u64));
    let mut line = String::new();
    let received = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    if !matches!(received, Ok(Ok(n)) if n > 0) {
        return;
    }
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(request) => handle(&agent, request).await,
        Err(error) => Response::Error {
            kind: FailureKind::InvalidInput,
            message: format!("the request is not valid: {error}"),
            causes: Vec::new(),
        },
    };
    let mut out = serde_json::to_vec(&response).expect("a response always serializes");
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

async fn handle(agent: &Agent, request: Request) -> Response {
    let (op, id) = match &request {
        Request::Put(put) => ("put", put.id.clone()),
        Request::Delete { id } => ("delete", id.clone()),
        Request::Get { id } => ("get", id.clone()),
        Request::List => ("list", String::new()),
    };
    let result = match request {
        Request::Put(put) => agent.put(put).await.map(Reply::Sandbox),
        Request::Delete { id } => agent.delete(&id).await.map(|()| Reply::Deleted { id }),
        Request::Get { id } => agent.get(&id).await.map(Reply::Sandbox),
        Request::List => Ok(Reply::Sandboxes(agent.list().await)),
    };
    match result {
        Ok(reply) => {
            tracing::info!(op, sandbox = %id, "request done");
            Response::Ok { reply }
        }
        Err(error) => {
            let kind = error.kind();
            tracing::warn!(op, sandbox = %id, ?kind, error = %crate::dns::error_chain(&error), "request refused");
            Response::failure(kind, &error)
        }
    }
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, agent: Arc<Agent>) {
    http_endpoint::serve(listener, move |stream| {
        answer_metrics(stream, agent.clone())
    })
    .await;
}

async fn answer_metrics(mut stream: TcpStream, agent: Arc<Agent>) {
    let Some(head) = http_endpoint::read_request_head(&mut stream, METRICS_REQUEST_TIMEOUT).await
    else {
        return;
    };
    let (status, content_type, body) = match http_endpoint::method_and_path(&head) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            render_metrics(&agent.metrics().await),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "only GET /metrics is served\n".to_string(),
        ),
    };
    http_endpoint::respond(&mut stream, status, content_type, &body).await;
}

/// The Prometheus text exposition format (version 0.0.4). Sandbox ids and
/// set names need no label escaping: ids are letters, digits, `.`, `_`, `-`
/// (`agent::check_id`), set names are the compiler's.
pub fn render_metrics(metrics: &AgentMetrics) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_sandbox = |value: &dyn Fn(&super::SandboxMetrics) -> u64| -> Vec<(String, u64)> {
        metrics
            .sandboxes
            .iter()
            .map(|s| (format!("{{sandbox=\"{}\"}}", s.status.id), value(s)))
            .collect()
    };
    family(
        "netleash_sandboxes",
        "gauge",
        "Sandboxes the agent enforces.",
        vec![(String::new(), metrics.sandboxes.len() as u64)],
    );
    family(
        "netleash_sandbox_allowed_packets_total",
        "counter",
        "Packets the sandbox's allow rules accepted: the packets that open a connection (the table's counters).",
        per_sandbox(&|s| s.status.allowed_packets),
    );
    family(
        "netleash_sandbox_allowed_bytes_total",
        "counter",
        "Bytes the sandbox's allow rules accepted (the table's counters).",
        per_sandbox(&|s| s.status.allowed_bytes),
    );
    family(
        "netleash_sandbox_denied_packets_total",
        "counter",
        "Packets the sandbox's deny rules rejected (the table's counters).",
        per_sandbox(&|s| s.status.denied_packets),
    );
    family(
        "netleash_sandbox_denied_bytes_total",
        "counter",
        "Bytes the sandbox's deny rules rejected (the table's counters).",
        per_sandbox(&|s| s.status.denied_bytes),
    );
    family(
        "netleash_sandbox_dns_queries_total",
        "counter",
        "DNS queries the sandbox's proxy received (UDP and TCP).",
        per_sandbox(&|s| s.status.dns_queries),
    );
    family(
        "netleash_sandbox_dns_allowed_total",
        "counter",
        "DNS queries for allowed names the proxy answered (from the cache or upstream).",
        per_sandbox(&|s| s.proxy.forwarded + s.proxy.cache_hits),
    );
    family(
        "netleash_sandbox_dns_refused_total",
        "counter",
        "DNS queries for names the policy does not allow, refused.",
        per_sandbox(&|s| s.status.dns_refused),
    );
    family(
        "netleash_sandbox_dns_upstream_queries_total",
        "counter",
        "Queries the sandbox's proxy forwarded upstream (cache misses).",
        per_sandbox(&|s| s.proxy.forwarded),
    );
    family(
        "netleash_sandbox_learned_elements_total",
        "counter",
        "Set elements added or refreshed from DNS answers: the addresses the sandbox is allowed to reach.",
        per_sandbox(&|s| s.sink.elements_added),
    );
    family(
        "netleash_sandbox_learn_failures_total",
        "counter",
        "Element writes into the sandbox's sets that failed.",
        per_sandbox(&|s| s.sink.failures),
    );
    family(
        "netleash_sandbox_denial_log_listening",
        "gauge",
        "1 if the sandbox's denied-connection log reads its nflog group; 0 if it is off (see the sandbox's status for why).",
        per_sandbox(&|s| u64::from(s.denial_log_listening)),
    );
    family(
        "netleash_sandbox_denial_log_packets_total",
        "counter",
        "Denied packets the sandbox's denied-connection log read from nflog.",
        per_sandbox(&|s| s.denials.packets),
    );
    family(
        "netleash_sandbox_denial_log_lines_total",
        "counter",
        "Denied-connection lines logged for the sandbox (one per destination per window).",
        per_sandbox(&|s| s.denials.logged),
    );
    family(
        "netleash_sandbox_denial_log_suppressed_total",
        "counter",
        "Denied-connection lines of the sandbox left out by the rate limit.",
        per_sandbox(&|s| s.denials.suppressed),
    );
    family(
        "netleash_sandbox_table_errors",
        "gauge",
        "1 if the sandbox's table could not be read at this scrape.",
        per_sandbox(&|s| u64::from(s.table_error.is_some())),
    );
    let set_sizes = metrics
        .sandboxes
        .iter()
        .flat_map(|s| {
            s.status.set_sizes.iter().map(|(set, size)| {
                (
                    format!("{{sandbox=\"{}\",set=\"{set}\"}}", s.status.id),
                    *size,
                )
            })
        })
        .collect();
    family(
        "netleash_sandbox_set_elements",
        "gauge",
        "Elements in each of the sandbox's sets.",
        set_sizes,
    );
    family(
        "netleash_resolver_names",
        "gauge",
        "Exact names the shared resolver loop keeps resolved (A and AAAA each).",
        vec![(String::new(), metrics.tracked_names as u64)],
    );
    family(
        "netleash_resolver_upstream_queries_total",
        "counter",
        "Lookups the shared resolver loop sent upstream.",
        vec![(String::new(), metrics.resolver.upstream_lookups)],
    );
    family(
        "netleash_resolver_errors_total",
        "counter",
        "Resolver loop failures: upstream lookups that failed, and writes into a sandbox's sets that failed.",
        vec![
            (
                "{kind=\"upstream\"}".to_string(),
                metrics.resolver.upstream_failures,
            ),
            (
                "{kind=\"sink\"}".to_string(),
                metrics.resolver.sink_failures,
            ),
        ],
    );
    family(
        "netleash_resolver_cache_hits_total",
        "counter",
        "Resolver loop lookups answered from the shared cache.",
        vec![(String::new(), metrics.resolver.cache_hits)],
    );
    family(
        "netleash_cache_entries",
        "gauge",
        "Answers in the shared DNS cache.",
        vec![(String::new(), metrics.cache.entries as u64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::SandboxMetrics;
    use crate::agent::protocol::SandboxStatus;

    #[test]
    fn metrics_are_prometheus_text_with_one_sample_per_sandbox() {
        let status = SandboxStatus {
            id: "c1".into(),
            allowed_packets: 7,
            denied_packets: 3,
            dns_queries: 5,
            dns_refused: 2,
            set_sizes: [("dns_v4".to_string(), 4u64)].into(),
            ..SandboxStatus::default()
        };
        let metrics = AgentMetrics {
            sandboxes: vec![SandboxMetrics {
                status,
                proxy: Default::default(),
                sink: Default::default(),
                denials: crate::denial_log::DenialStats {
                    packets: 4,
                    logged: 1,
                    repeated: 3,
                    ..Default::default()
                },
                denial_log_listening: true,
                table_error: None,
            }],
            resolver: Default::default(),
            tracked_names: 7,
            cache: crate::dns::cache::AnswerCache::default().stats(),
        };
        let text = render_metrics(&metrics);
        for line in [
            "netleash_sandboxes 1",
            "netleash_sandbox_allowed_packets_total{sandbox=\"c1\"} 7",
            "netleash_sandbox_denied_packets_total{sandbox=\"c1\"} 3",
            "netleash_sandbox_dns_queries_total{sandbox=\"c1\"} 5",
            "netleash_sandbox_dns_refused_total{sandbox=\"c1\"} 2",
            "netleash_sandbox_set_elements{sandbox=\"c1\",set=\"dns_v4\"} 4",
            "netleash_sandbox_denial_log_listening{sandbox=\"c1\"} 1",
            "netleash_sandbox_denial_log_packets_total{sandbox=\"c1\"} 4",
            "netleash_sandbox_denial_log_lines_total{sandbox=\"c1\"} 1",
            "netleash_sandbox_denial_log_suppressed_total{sandbox=\"c1\"} 0",
            "netleash_resolver_names 7",
            "# TYPE netleash_resolver_upstream_queries_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let first = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let error = bind_socket(&path).unwrap_err();
        assert!(matches!(error, Error::InUse { .. }), "{error:?}");
        drop(first);
        // The file stays behind, nobody answers: stale.
        assert!(path.exists());
        let _second = bind_socket(&path).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            bind_socket(&file).unwrap_err(),
            Error::NotSocket { .. }
        ));
    }
}
