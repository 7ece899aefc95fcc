//! The one binary format of the benchmark's event files, for both loads
//! ([`crate::loadgen`]: a connection per event; [`crate::keepalive`]: a
//! request per event): an 8-byte magic naming the load, then 24 bytes per
//! event, little-endian: start_ns u64, latency_us u32, generation u32 (0
//! for unknown), outcome u8, flags u8, 6 zero bytes.

use std::io::{self, ErrorKind, Read, Write};

/// One event as the file records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// `CLOCK_MONOTONIC` when it started, in nanoseconds.
    pub start_ns: u64,
    pub latency_us: u32,
    /// The generation that answered, when known.
    pub generation: Option<u32>,
    /// The load's outcome kind, as its `u8`.
    pub outcome: u8,
    /// The load's flags (0 where it has none).
    pub flags: u8,
}

const RECORD: usize = 24;

/// Writes `magic`, then `records`.
pub fn write(
    mut out: impl Write,
    magic: &[u8; 8],
    records: impl IntoIterator<Item = Record>,
) -> io::Result<()> {
    out.write_all(magic)?;
    for r in records {
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&r.start_ns.to_le_bytes());
        record[8..12].copy_from_slice(&r.latency_us.to_le_bytes());
        record[12..16].copy_from_slice(&r.generation.unwrap_or(0).to_le_bytes());
        record[16] = r.outcome;
        record[17] = r.flags;
        out.write_all(&record)?;
    }
    out.flush()
}

/// Reads what [`write`] wrote with `magic`.
pub fn read(mut input: impl Read, magic: &[u8; 8]) -> io::Result<Vec<Record>> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes)?;
    let records = bytes.strip_prefix(magic.as_slice()).ok_or_else(|| {
        invalid(&format!(
            "no {} header",
            String::from_utf8_lossy(magic.as_slice())
        ))
    })?;
    if records.len() % RECORD != 0 {
        return Err(invalid("truncated record"));
    }
    Ok(records
        .chunks_exact(RECORD)
        .map(|r| {
            let generation = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            Record {
                start_ns: u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                latency_us: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
                generation: (generation != 0).then_some(generation),
                outcome: r[16],
                flags: r[17],
            }
        })
        .collect())
}

/// An event file that is not one: `what` is wrong.
pub fn invalid(what: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, format!("event file: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout both loads wrote before they shared this codec: files
    /// written by an older bench read the same.
    #[test]
    fn a_record_has_the_layout_both_loads_wrote() {
        let record = Record {
            start_ns: 0x0102_0304_0506_0708,
            latency_us: 0x0a0b_0c0d,
            generation: Some(7),
            outcome: 3,
            flags: 9,
        };
        let mut bytes = Vec::new();
        write(&mut bytes, b"RLDTEST1", [record]).unwrap();
        assert_eq!(
            bytes,
            [
                b"RLDTEST1".as_slice(),
                &[
                    8, 7, 6, 5, 4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a, 7, 0, 0, 0, 3, 9
                ],
                &[0; 6],
            ]
            .concat()
        );
        assert_eq!(read(bytes.as_slice(), b"RLDTEST1").unwrap(), [record]);
        assert!(
            read(bytes.as_slice(), b"RLDLOAD1").is_err(),
            "another load's file"
        );
        let unknown = Record {
            generation: None,
            ..record
        };
        let mut bytes = Vec::new();
        write(&mut bytes, b"RLDTEST1", [unknown]).unwrap();
        assert_eq!(read(bytes.as_slice(), b"RLDTEST1").unwrap(), [unknown]);
    }
}
