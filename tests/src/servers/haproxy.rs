//! HAProxy 2.6 (Debian): binds with `SO_REUSEPORT` by default. One config
//! for every generation: `${RELOADER_GENERATION}` is expanded from the
//! environment, `%pid` and `%[thread]` name the process and thread that
//! answered. Two threads share one listener.
//!
//! - `-db`: one process in the foreground; soft stop is `USR1`.
//! - `-W -db`: master-worker; the master forks the worker (which holds the
//!   listener). `USR2` would make the master re-exec itself (its own reload),
//!   `TERM` is a hard stop; `USR1` makes the master soft-stop its worker and
//!   exit once the worker has finished ("All workers exited").

use super::{Answerers, Server, probe_options, require, shared_tempdir, version_of, write};

const HAPROXY: &str = "/usr/sbin/haproxy";

pub fn server(addr: &str, master_worker: bool) -> Server {
    require(HAPROXY.as_ref(), "HAProxy");
    let dir = shared_tempdir();
    let config = write(
        dir.path(),
        "haproxy.cfg",
        &format!(
            "global\n    nbthread 2\n\
             defaults\n    mode http\n    timeout connect 5s\n    timeout client 10s\n    \
             timeout server 10s\n\
             frontend fe\n    bind {addr}\n    http-request return status 200 content-type \
             text/plain lf-string \"gen=${{RELOADER_GENERATION}} pid=%pid thread=%[thread]\\n\"\n"
        ),
    );
    let mut command = vec![HAPROXY.to_owned()];
    if master_worker {
        command.push("-W".into());
    }
    command.extend(["-db".into(), "-f".into(), config]);
    Server {
        name: if master_worker {
            "HAProxy master-worker (-W, nbthread 2)".into()
        } else {
            "HAProxy (-db, nbthread 2)".into()
        },
        version: version_of(HAPROXY, &["-v"]),
        command,
        options: probe_options("USR1", addr),
        env: Vec::new(),
        answerers: if master_worker {
            Answerers::Children { threads: 2 }
        } else {
            Answerers::Process { threads: 2 }
        },
        label: None,
        dir,
    }
}
