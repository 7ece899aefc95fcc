//! gunicorn (PyPI, in target/venv) with `--reuse-port`: every *worker*
//! process opens its own `SO_REUSEPORT` listener once it has booted (the
//! arbiter holds none), so a generation's listeners appear one by one, and
//! with `--max-requests` workers exit and are replaced (with new
//! listeners) while the generation serves. Graceful stop: `TERM`.

use super::{Answerers, Server, probe_options, require, shared_tempdir, venv, version_of, write};

const APP: &str = r#"import os

GENERATION = os.environ.get("RELOADER_GENERATION", "0")


def app(environ, start_response):
    body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]
"#;

/// `--max-requests N --max-requests-jitter J`.
#[derive(Clone, Copy, Debug)]
pub struct MaxRequests {
    pub max: u32,
    pub jitter: u32,
}

pub fn server(addr: &str, workers: u32, max_requests: Option<MaxRequests>) -> Server {
    let gunicorn = venv().join("bin/gunicorn");
    require(&gunicorn, "gunicorn (PyPI, in target/venv)");
    let dir = shared_tempdir();
    write(dir.path(), "app.py", APP);
    let mut command = vec![
        gunicorn.display().to_string(),
        "--reuse-port".into(),
        "--workers".into(),
        workers.to_string(),
        "--bind".into(),
        addr.into(),
        "--chdir".into(),
        dir.path().display().to_string(),
    ];
    let mut name = format!("gunicorn (--reuse-port, {workers} workers");
    if let Some(MaxRequests { max, jitter }) = max_requests {
        command.extend([
            "--max-requests".into(),
            max.to_string(),
            "--max-requests-jitter".into(),
            jitter.to_string(),
        ]);
        name += &format!(", --max-requests {max} --max-requests-jitter {jitter}");
    }
    name += ")";
    command.push("app:app".into());
    Server {
        name,
        version: version_of(&gunicorn.display().to_string(), &["--version"]),
        command,
        options: probe_options("TERM", addr),
        env: Vec::new(),
        answerers: Answerers::Children { threads: 1 },
        label: None,
        dir,
    }
}
