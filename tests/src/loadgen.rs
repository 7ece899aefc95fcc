//! The benchmark's event files: the one load client
//! ([`reloader::demo::load`]) drives the load (binary `loadgen`, run by
//! `cargo xtask bench`), and every connection is written as one compact
//! [`Event`] in the event file format ([`crate::events`]; [`write_events`],
//! [`read_events`]) that the bench aggregates.

use std::{
    future::Future,
    io::{self, Read, Write},
};

use crate::events::{self, Record};

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

/// Writes events: the `RLDLOAD1` header, then a record per event, its
/// kind as the outcome (no flags).
pub fn write_events(out: impl Write, events: &[Event]) -> io::Result<()> {
    events::write(
        out,
        MAGIC,
        events.iter().map(|e| Record {
            start_ns: e.start_ns,
            latency_us: e.latency_us,
            generation: e.generation,
            outcome: e.kind as u8,
            flags: 0,
        }),
    )
}

/// Reads what [`write_events`] wrote.
pub fn read_events(input: impl Read) -> io::Result<Vec<Event>> {
    events::read(input, MAGIC)?
        .into_iter()
        .map(|r| {
            Ok(Event {
                start_ns: r.start_ns,
                latency_us: r.latency_us,
                generation: r.generation,
                kind: Kind::from_u8(r.outcome)
                    .ok_or_else(|| events::invalid("unknown outcome kind"))?,
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
        assert_eq!(bytes.len(), MAGIC.len() + 24 * events.len());
        assert_eq!(read_events(bytes.as_slice()).unwrap(), events);
        assert!(read_events(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_events(&b"garbage!"[..]).is_err());
    }
}
