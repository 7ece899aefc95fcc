//! DNS servers wrapped unmodified, and the smallest DNS client the tests
//! need (its queries are built by `reloader::dns`, as the probe's are).
//!
//! Each server answers authoritatively for the zone `test.` with no upstream:
//! `gen.test. A 127.0.0.1` (what the readiness probe asks: type A, recursion
//! not desired) and `gen.test. TXT "N"`, N the generation that answered, so
//! a test can tell which generation served a query. Every generation gets a
//! config file of its own (`{generation}` in the command selects it), in a
//! temporary directory, with its own pid file and state, in the foreground,
//! as root, no chroot:
//!
//! - unbound 1.17: `so-reuseport: yes` and `num-threads: 2` → two UDP (and
//!   two TCP) sockets per generation, `local-zone: "test." static`. Stops on
//!   `TERM`.
//! - Knot DNS 3.2: `udp-workers: 2` → two UDP sockets (Knot sets
//!   `SO_REUSEPORT` on UDP itself, "using UDP reuseport" in its log),
//!   `tcp-reuseport: on` so a second instance can bind TCP too; the zone
//!   from a zone file. Stops on `TERM`.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use super::require;
use crate::servers::{shared_tempdir, version_of, write};

/// The name whose TXT record names the generation.
pub const GEN_NAME: &str = "gen.test";

/// Which DNS server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Unbound,
    Knot,
}

/// A DNS server ready to run, one config per generation.
pub struct DnsServer {
    pub kind: Kind,
    pub name: &'static str,
    pub version: String,
    /// The command; `{generation}` selects that generation's config.
    pub command: Vec<String>,
    /// UDP sockets one generation binds on the address.
    pub udp_sockets: usize,
    /// Its graceful stop.
    pub drain: &'static str,
    pub dir: tempfile::TempDir,
}

const UNBOUND: &str = "/usr/sbin/unbound";
const KNOTD: &str = "/usr/sbin/knotd";

impl DnsServer {
    /// `kind` answering on `addr`, with configs for generations
    /// `1..=generations`.
    pub fn new(kind: Kind, addr: SocketAddr, generations: u64) -> Self {
        match kind {
            Kind::Unbound => unbound(addr, generations),
            Kind::Knot => knot(addr, generations),
        }
    }
}

fn unbound(addr: SocketAddr, generations: u64) -> DnsServer {
    require(Path::new(UNBOUND), "unbound (Debian's unbound)");
    let dir = shared_tempdir();
    let d = dir.path().display().to_string();
    for generation in 1..=generations {
        write(
            dir.path(),
            &format!("unbound-{generation}.conf"),
            &format!(
                "server:\n\
                 \tinterface: {ip}@{port}\n\
                 \tso-reuseport: yes\n\
                 \tnum-threads: 2\n\
                 \tdo-daemonize: no\n\
                 \tchroot: \"\"\n\
                 \tusername: \"\"\n\
                 \tdirectory: \"{d}\"\n\
                 \tpidfile: \"{d}/unbound-{generation}.pid\"\n\
                 \tuse-syslog: no\n\
                 \tlogfile: \"\"\n\
                 \tverbosity: 1\n\
                 \tdo-ip6: no\n\
                 \tmodule-config: \"iterator\"\n\
                 \tlocal-zone: \"test.\" static\n\
                 \tlocal-data: \"{GEN_NAME}. 60 IN A 127.0.0.1\"\n\
                 \tlocal-data: '{GEN_NAME}. 60 IN TXT \"{generation}\"'\n\
                 remote-control:\n\
                 \tcontrol-enable: no\n",
                ip = addr.ip(),
                port = addr.port(),
            ),
        );
    }
    DnsServer {
        kind: Kind::Unbound,
        name: "unbound",
        version: version_of(UNBOUND, &["-V"]),
        command: vec![
            UNBOUND.into(),
            "-d".into(),
            "-c".into(),
            format!("{d}/unbound-{{generation}}.conf"),
        ],
        udp_sockets: 2,
        drain: "TERM",
        dir,
    }
}

fn knot(addr: SocketAddr, generations: u64) -> DnsServer {
    require(Path::new(KNOTD), "Knot DNS (Debian's knot)");
    let dir = shared_tempdir();
    for generation in 1..=generations {
        let g = dir.path().join(format!("knot-{generation}"));
        for sub in ["run", "db"] {
            std::fs::create_dir_all(g.join(sub)).expect("knot state directories");
        }
        let gd = g.display().to_string();
        write(
            &g,
            "test.zone",
            &format!(
                "$ORIGIN test.\n$TTL 60\n\
                 @ SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n\
                 @ NS ns.test.\n\
                 ns A 127.0.0.1\n\
                 gen A 127.0.0.1\n\
                 gen TXT \"{generation}\"\n"
            ),
        );
        write(
            dir.path(),
            &format!("knot-{generation}.conf"),
            &format!(
                "server:\n\
                 \x20   rundir: \"{gd}/run\"\n\
                 \x20   listen: {ip}@{port}\n\
                 \x20   udp-workers: 2\n\
                 \x20   tcp-workers: 1\n\
                 \x20   tcp-reuseport: on\n\
                 \x20   background-workers: 1\n\
                 database:\n\
                 \x20   storage: \"{gd}/db\"\n\
                 log:\n\
                 \x20 - target: stderr\n\
                 \x20   any: info\n\
                 zone:\n\
                 \x20 - domain: test\n\
                 \x20   storage: \"{gd}\"\n\
                 \x20   file: \"test.zone\"\n",
                ip = addr.ip(),
                port = addr.port(),
            ),
        );
    }
    DnsServer {
        kind: Kind::Knot,
        name: "Knot DNS",
        version: version_of(KNOTD, &["-V"]),
        command: vec![
            KNOTD.into(),
            "-c".into(),
            format!("{}/knot-{{generation}}.conf", dir.path().display()),
        ],
        udp_sockets: 2,
        drain: "TERM",
        dir,
    }
}

/// A reply's rcode and the strings of its TXT answers.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub rcode: u8,
    pub txt: Vec<String>,
}

/// Skips a (possibly compressed) name at `at`; returns the offset after it.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *message.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + l as usize,
        }
    }
}

/// Parses the reply to query `id`.
pub fn parse_reply(id: u16, message: &[u8]) -> Result<Reply, String> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([
            *message.get(at)?,
            *message.get(at + 1)?,
        ]))
    };
    let malformed = || format!("malformed reply: {message:02x?}");
    if message.len() < 12 {
        return Err(malformed());
    }
    if u16_at(0) != Some(id) {
        return Err(format!("reply to another query (id {:?})", u16_at(0)));
    }
    if message[2] & 0x80 == 0 {
        return Err("not a response".into());
    }
    let rcode = message[3] & 0x0f;
    let questions = u16_at(4).ok_or_else(malformed)?;
    let answers = u16_at(6).ok_or_else(malformed)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(message, at).ok_or_else(malformed)? + 4;
    }
    let mut txt = Vec::new();
    for _ in 0..answers {
        at = skip_name(message, at).ok_or_else(malformed)?;
        let rtype = u16_at(at).ok_or_else(malformed)?;
        let rdlength = u16_at(at + 8).ok_or_else(malformed)? as usize;
        let rdata = message
            .get(at + 10..at + 10 + rdlength)
            .ok_or_else(malformed)?;
        if rtype == 16 {
            let mut i = 0;
            let mut text = String::new();
            while let Some(&len) = rdata.get(i) {
                let chunk = rdata
                    .get(i + 1..i + 1 + len as usize)
                    .ok_or_else(malformed)?;
                text.push_str(&String::from_utf8_lossy(chunk));
                i += 1 + len as usize;
            }
            txt.push(text);
        }
        at += 10 + rdlength;
    }
    Ok(Reply { rcode, txt })
}

/// Asks `addr` for `name`/`qtype` from `socket`; waits up to `timeout`.
pub fn query(
    socket: &UdpSocket,
    addr: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Result<Reply, String> {
    let id: u16 = rand_id();
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(&reloader::dns::query(id, name, qtype), addr)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = socket.recv(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {timeout:?}")
            }
            _ => format!("recv: {e}"),
        })?;
        match parse_reply(id, &buf[..n]) {
            // A late answer to an earlier query on this socket.
            Err(e) if e.starts_with("reply to another query") => continue,
            other => return other,
        }
    }
}

fn rand_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: a valid 2-byte buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), 2, 0) };
    assert_eq!(n, 2, "getrandom");
    u16::from_ne_bytes(id)
}

/// The generation that answered a `gen.test TXT` query from `socket`.
pub fn generation_from(socket: &UdpSocket, addr: SocketAddr) -> Result<u64, String> {
    let reply = query(
        socket,
        addr,
        GEN_NAME,
        reloader::dns::TYPE_TXT,
        Duration::from_secs(1),
    )?;
    if reply.rcode != 0 {
        return Err(format!("rcode {}", reply.rcode));
    }
    reply
        .txt
        .first()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("no generation in the TXT answer {:?}", reply.txt))
}

/// The generation that answered, from a fresh socket (a new source port:
/// a new flow).
pub fn generation(addr: SocketAddr) -> Result<u64, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    generation_from(&socket, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_txt_answer_with_a_compressed_name_is_parsed() {
        let mut reply = reloader::dns::query(9, "gen.test", reloader::dns::TYPE_TXT);
        reply[2] |= 0x84;
        reply[7] = 1; // one answer
        // Name: pointer to the question's name at offset 12.
        reply.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, 0, 3, 2, b'1', b'7']);
        assert_eq!(
            parse_reply(9, &reply),
            Ok(Reply {
                rcode: 0,
                txt: vec!["17".into()]
            })
        );
        assert!(
            parse_reply(8, &reply)
                .unwrap_err()
                .contains("another query")
        );
        assert!(parse_reply(9, &reply[..reply.len() - 1]).is_err());
    }
}
