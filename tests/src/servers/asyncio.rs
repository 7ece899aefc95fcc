//! A Python asyncio server (`asyncio_server.py`, run by Debian's python3):
//! `asyncio.start_server(..., reuse_port=True)`, graceful stop on `TERM`.

use super::{Answerers, Server, probe_options, require, shared_tempdir, version_of, write};

const PYTHON: &str = "/usr/bin/python3";

pub fn server(addr: &str) -> Server {
    require(PYTHON.as_ref(), "Debian's python3");
    let dir = shared_tempdir();
    let script = write(
        dir.path(),
        "asyncio_server.py",
        include_str!("asyncio_server.py"),
    );
    Server {
        name: "Python asyncio (start_server reuse_port=True)".into(),
        version: version_of(PYTHON, &["--version"]),
        command: vec![PYTHON.into(), script, addr.into()],
        options: probe_options("TERM", addr),
        env: Vec::new(),
        answerers: Answerers::Process { threads: 1 },
        label: None,
        dir,
    }
}
