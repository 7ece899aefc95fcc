//! A client of Prometheus's HTTP API (`GET /api/v1/query`, instant
//! queries), blocking: `reloader fleet` runs in the CLI, without a
//! runtime. Over TLS it trusts Mozilla's roots (webpki-roots) or, with a
//! CA file, only the certificates in it; basic auth or a bearer token,
//! each read from a file or the environment so that no secret shows in
//! the process list.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use base64::Engine;
use serde::Deserialize;
use thiserror::Error;

/// Errors of the Prometheus client.
#[derive(Debug, Error)]
pub enum PrometheusError {
    /// The CA file could not be read.
    #[error("--ca-file {}: cannot read it", path.display())]
    CaFileError {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate.
    #[error("--ca-file {}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    /// A secret file could not be read.
    #[error("{flag} {}: cannot read it", path.display())]
    SecretFileError {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The request failed (connection, TLS, timeout).
    #[error("asking Prometheus at {url} failed")]
    RequestError {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Prometheus answered with an HTTP error.
    #[error("Prometheus at {url} answered HTTP {code}{}", hint_for(*code))]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    /// The answer is not what the API documents.
    #[error("Prometheus at {url} gave an answer that is not a query result: {reason}")]
    BadAnswer { url: String, reason: String },
    /// Prometheus refused the query.
    #[error("Prometheus refused the query `{query}`: {error_type}: {error}")]
    QueryFailed {
        query: String,
        error_type: String,
        error: String,
    },
}

fn hint_for(code: u16) -> &'static str {
    match code {
        401 | 403 => " (give --user with --password-file, or --bearer-token-file)",
        404 => " (is --prometheus the server's base URL, e.g. http://prometheus:9090?)",
        _ => "",
    }
}

/// How to reach Prometheus.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Its base URL (`http://prometheus:9090`, or with a path prefix).
    pub url: String,
    pub auth: Auth,
    /// Trust only the certificates in this PEM file.
    pub ca_file: Option<PathBuf>,
    /// Each request's timeout, all of it.
    pub timeout: Duration,
}

/// How to authenticate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer {
        token: String,
    },
}

impl Auth {
    /// The `Authorization` header's value.
    fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            Auth::Bearer { token } => Some(format!("Bearer {token}")),
        }
    }
}

/// A secret from `path` (its first line), or else from the environment
/// variable `env`.
pub fn read_secret(
    flag: &'static str,
    path: Option<&std::path::Path>,
    env: &str,
) -> Result<Option<String>, PrometheusError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| {
                PrometheusError::SecretFileError {
                    flag,
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
        }
        None => Ok(std::env::var(env).ok().filter(|v| !v.is_empty())),
    }
}

/// One series of an instant vector: its labels (`__name__` too, when the
/// query keeps it) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus server to ask.
pub struct Prometheus {
    agent: ureq::Agent,
    endpoint: String,
    authorization: Option<String>,
}

impl Prometheus {
    /// A client for `connection` (its CA file read now).
    pub fn new(connection: &Connection) -> Result<Self, PrometheusError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &connection.ca_file {
            let pem = std::fs::read(path).map_err(|source| PrometheusError::CaFileError {
                path: path.clone(),
                source,
            })?;
            let certificates: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certificates.is_empty() {
                return Err(PrometheusError::NoCertificate { path: path.clone() });
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certificates));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(connection.timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Self {
            agent,
            endpoint: format!("{}/api/v1/query", connection.url.trim_end_matches('/')),
            authorization: connection.auth.header(),
        })
    }

    /// The instant vector `query` evaluates to now.
    pub fn query(&self, query: &str) -> Result<Vec<Sample>, PrometheusError> {
        let url = self.endpoint.clone();
        let mut request = self.agent.get(&url).query("query", query);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let mut response = request
            .call()
            .map_err(|source| PrometheusError::RequestError {
                url: url.clone(),
                source: Box::new(source),
            })?;
        let code = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(|source| {
            PrometheusError::RequestError {
                url: url.clone(),
                source: Box::new(source),
            }
        })?;
        // The API answers a bad query with 400 and a JSON error: that is
        // the error to show, not the status code.
        if code != 200 && !(code == 400 || code == 422) {
            return Err(PrometheusError::Status {
                url,
                code,
                body: body.chars().take(200).collect(),
            });
        }
        parse(&url, query, &body)
    }
}

/// The API's envelope (`status`, `data` or `errorType`/`error`).
#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    /// `[unix time, "value"]`.
    value: (f64, String),
}

/// Reads an answer to `query` (from `url`).
fn parse(url: &str, query: &str, body: &str) -> Result<Vec<Sample>, PrometheusError> {
    let bad = |reason: String| PrometheusError::BadAnswer {
        url: url.to_owned(),
        reason,
    };
    let envelope: Envelope = serde_json::from_str(body).map_err(|e| bad(e.to_string()))?;
    if envelope.status != "success" {
        return Err(PrometheusError::QueryFailed {
            query: query.to_owned(),
            error_type: envelope.error_type.unwrap_or_default(),
            error: envelope.error.unwrap_or_default(),
        });
    }
    let data = envelope.data.ok_or_else(|| bad("no `data`".into()))?;
    if data.result_type != "vector" {
        return Err(bad(format!(
            "a {} where an instant vector was asked for",
            data.result_type
        )));
    }
    data.result
        .into_iter()
        .map(|s| {
            let value = s
                .value
                .1
                .parse()
                .map_err(|_| bad(format!("the value {:?} is not a number", s.value.1)))?;
            Ok(Sample {
                labels: s.metric,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
    };

    use super::*;

    const VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"__name__":"up","job":"edge","instance":"10.0.0.1:9477"},"value":[1700000000.1,"1"]},
        {"metric":{"job":"edge","instance":"10.0.0.2:9477"},"value":[1700000000.1,"0"]}]}}"#;

    #[test]
    fn reads_an_instant_vector_and_the_apis_errors() {
        let samples = parse("u", "up", VECTOR).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["instance"], "10.0.0.1:9477");
        assert_eq!((samples[0].value, samples[1].value), (1.0, 0.0));
        let refused = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        let error = parse("u", "up{", refused).unwrap_err().to_string();
        assert_eq!(
            error,
            "Prometheus refused the query `up{`: bad_data: parse error"
        );
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse("u", "up[1m]", matrix).is_err());
        assert!(parse("u", "up", "<html>").is_err());
    }

    /// One HTTP exchange on a loopback listener: returns the request head
    /// the client sent, answering `status` and `body`.
    fn serve_once(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/prefix/", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(head).unwrap()
        });
        (url, server)
    }

    fn connection(url: String, auth: Auth) -> Connection {
        Connection {
            url,
            auth,
            ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn sends_the_query_and_a_bearer_token() {
        let (url, server) = serve_once("200 OK", VECTOR);
        let token = Auth::Bearer {
            token: "s3cret".into(),
        };
        let prometheus = Prometheus::new(&connection(url, token)).unwrap();
        let samples = prometheus.query("up{job=\"edge\"}").unwrap();
        assert_eq!(samples.len(), 2);
        let head = server.join().unwrap();
        assert!(
            head.starts_with("GET /prefix/api/v1/query?query=up%7Bjob%3D%22edge%22%7D HTTP/1.1"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer s3cret\r\n"),
            "{head}"
        );
    }

    #[test]
    fn sends_basic_auth_and_explains_a_refusal() {
        let (url, server) = serve_once("401 Unauthorized", "Unauthorized");
        let basic = Auth::Basic {
            user: "fleet".into(),
            password: "pa:ss".into(),
        };
        let prometheus = Prometheus::new(&connection(url, basic)).unwrap();
        let error = prometheus.query("up").unwrap_err().to_string();
        assert!(error.contains("answered HTTP 401"), "{error}");
        assert!(error.contains("--password-file"), "{error}");
        let head = server.join().unwrap();
        // base64("fleet:pa:ss")
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: basic zmxlzxq6cge6c3m=\r\n"),
            "{head}"
        );
    }
}
