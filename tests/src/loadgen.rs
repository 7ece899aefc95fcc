//! The benchmark's event files: the one load client
//! ([`reloader::demo::load`]) drives the load (binary `loadgen`, run by
//! `cargo xtask bench`), and every connection is written as one compact
//! [`Event`] in a fixed little-endian layout ([`write_events`],
//! [`read_events`]) that the bench aggregates.

use std::{
    future::Future,
    io::{self, ErrorKind, Read, Write},
};

pub use reloader::demo::load::{Config, Kind, Pace, monotonic_ns};

/// One connection, as the event file records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` when the connection started, in nanoseconds.
    pub start_ns: u64,
    /// Connect + request + complete response (or until the failure), µs.
    pub latency_us: u32,
    pub kind: Kind,
    /// The generation that answered, when the response said.
    pub generation: Option<u32>,
}

impl From<&reloader::demo::load::Event> for Event {
    fn from(e: &reloader::demo::load::Event) -> Self {
        Self {
            start_ns: e.start_ns,
            latency_us: e.latency_us,
            kind: e.kind,
            generation: e.generation().and_then(|g| u32::try_from(g).ok()),
        }
    }
}

/// Runs the load until `stop` (see [`reloader::demo::load::run`]).
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Vec<Event> {
    reloader::demo::load::run(config, stop)
        .await
        .iter()
        .map(Event::from)
        .collect()
}

const MAGIC: &[u8; 8] = b"RLDLOAD1";
const RECORD: usize = 24;

/// Writes events: a magic header, then 24 bytes per event (start_ns u64,
/// latency_us u32, generation u32 with 0 for unknown, kind u8, 7 zero
/// bytes), little-endian.
pub fn write_events(mut out: impl Write, events: &[Event]) -> io::Result<()> {
    out.write_all(MAGIC)?;
    for e in events {
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&e.start_ns.to_le_bytes());
        record[8..12].copy_from_slice(&e.latency_us.to_le_bytes());
        record[12..16].copy_from_slice(&e.generation.unwrap_or(0).to_le_bytes());
        record[16] = e.kind as u8;
        out.write_all(&record)?;
    }
    out.flush()
}

/// Reads what [`write_events`] wrote.
pub fn read_events(mut input: impl Read) -> io::Result<Vec<Event>> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, format!("event file: {what}"));
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes)?;
    let records = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| bad("no RLDLOAD1 header"))?;
    if records.len() % RECORD != 0 {
        return Err(bad("truncated record"));
    }
    records
        .chunks_exact(RECORD)
        .map(|r| {
            let generation = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            Ok(Event {
                start_ns: u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                latency_us: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
                generation: (generation != 0).then_some(generation),
                kind: Kind::from_u8(r[16]).ok_or_else(|| bad("unknown outcome kind"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_the_file_format() {
        let events: Vec<Event> = Kind::ALL
            .iter()
            .enumerate()
            .map(|(i, &kind)| Event {
                start_ns: 1_000_000_000_000 + i as u64,
                latency_us: 17 * i as u32,
                kind,
                generation: (i % 2 == 0).then_some(i as u32 + 1),
            })
            .collect();
        let mut bytes = Vec::new();
        write_events(&mut bytes, &events).unwrap();
        assert_eq!(bytes.len(), MAGIC.len() + RECORD * events.len());
        assert_eq!(read_events(bytes.as_slice()).unwrap(), events);
        assert!(read_events(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_events(&b"garbage!"[..]).is_err());
    }
}
