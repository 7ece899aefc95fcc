//! nginx 1.22 (Debian's nginx-light) through the shared helper
//! ([`crate::nginx`]): `listen … reuseport`, two worker processes (each
//! its own listener), graceful stop with `QUIT`.

use super::{Answerers, Server, probe_options, version_of};

pub fn server(addr: &str, generations: u64) -> Server {
    let nginx = crate::nginx::Nginx::new(addr, generations);
    Server {
        name: "nginx (2 workers, listen reuseport)".into(),
        version: version_of("/usr/sbin/nginx", &["-v"]),
        command: nginx.command(),
        options: probe_options("QUIT", addr),
        env: Vec::new(),
        answerers: Answerers::Children { threads: 1 },
        label: None,
        dir: nginx.dir,
    }
}
