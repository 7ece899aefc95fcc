//! The control protocol between `reloader reload|status|stop` and the
//! running controller: the messages and their encoding.
//!
//! One Unix stream socket per instance (mode 0600). A client sends one
//! request as a single JSON line and reads one JSON line back. Requests are
//! limited to [`MAX_REQUEST`] bytes; anything malformed, oversized, unknown
//! or truncated gets an [`Response::Error`] and changes nothing. Only root
//! and the controller's own uid may talk to it (`SO_PEERCRED`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::CanaryPlan,
    status::{ReloadReport, RollbackReport, StatusReport},
};

/// Largest request accepted, newline included.
pub const MAX_REQUEST: usize = 4096;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Start a reload; with `wait`, answer when it completed (new
    /// generation active everywhere and the old one exited or held; a
    /// canary promoted or rolled back).
    Reload {
        wait: bool,
        /// Start the new generation as a canary.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<CanaryPlan>,
    },
    /// Make the held generation active again, or send nothing more to the
    /// canary; with `wait`, answer once the generation rolled back from
    /// has exited.
    Rollback { wait: bool },
    /// Send every new connection to the canary; with `wait`, answer once
    /// the generation beside it has exited (at once when it is held).
    Promote {
        /// Absent in requests of older clients: no wait.
        #[serde(default)]
        wait: bool,
    },
    /// The instance's state. (Empty struct variants, not unit ones: serde
    /// applies `deny_unknown_fields` only to those.)
    Status {},
    /// Drain every generation and exit. With a deadline (wall-clock
    /// milliseconds since the epoch: the client's, on this host), a stop
    /// that reaches the controller after it is not carried out: its client
    /// has given up and said so.
    Stop {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_unix_ms: Option<u64>,
    },
    /// Exit without signalling any generation, leaving them, the state
    /// file, the pinned maps and the log keeper to the next controller
    /// (`reloader handover`: a new binary adopts them).
    Handover {},
}

/// What the controller answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    /// The reload request was accepted (no `wait`).
    ReloadAccepted,
    /// The reload completed.
    ReloadDone {
        report: ReloadReport,
    },
    /// The reload failed; the previous generation is still active.
    ReloadFailed {
        report: ReloadReport,
    },
    /// The new generation was rolled back; the previous one is active.
    ReloadRolledBack {
        report: ReloadReport,
    },
    /// A rollback was done.
    RolledBack {
        report: RollbackReport,
    },
    /// The canary is active.
    Promoted {
        generation: u64,
        previous: u64,
        /// With `wait`: from the promotion until `previous` exited.
        #[serde(default)]
        previous_exited_ms: Option<f64>,
        /// With `wait`, when `previous` is held (`--keep-previous`): how
        /// much longer it is kept before it drains.
        #[serde(default)]
        held_ms: Option<f64>,
    },
    Status {
        status: Box<StatusReport>,
    },
    /// The controller is stopping.
    Stopping,
    /// The controller hands over: once no reload runs, it exits (status
    /// 75) leaving every generation running for the next `reloader run`.
    HandingOver {
        controller_pid: u32,
    },
    /// The request was refused or could not be read.
    Error {
        message: String,
    },
    /// Every connection place is taken; ask again (the CLI does, with
    /// backoff, until its `--timeout`).
    Busy {
        message: String,
    },
}

/// Why a request line could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// More than [`MAX_REQUEST`] bytes before the newline.
    #[error("request larger than {MAX_REQUEST} bytes")]
    TooLarge,
    /// The connection closed before a full line arrived.
    #[error("truncated request: the connection closed before a newline")]
    Truncated,
    /// Not a request we know.
    #[error("malformed request: {reason}")]
    Malformed { reason: String },
}

/// Decodes one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() >= MAX_REQUEST {
        return Err(DecodeError::TooLarge);
    }
    let request: Request = serde_json::from_slice(line).map_err(|e| DecodeError::Malformed {
        reason: e.to_string(),
    })?;
    if let Request::Reload {
        canary: Some(plan), ..
    } = &request
    {
        plan.check()
            .map_err(|reason| DecodeError::Malformed { reason })?;
    }
    Ok(request)
}

/// Encodes a message as one JSON line.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("control messages serialize");
    line.push(b'\n');
    line
}

/// Whether a peer with `uid` may control an instance run by `owner`.
pub fn peer_allowed(uid: u32, owner: u32) -> bool {
    uid == 0 || uid == owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::Reload {
                wait: true,
                canary: None,
            },
            Request::Reload {
                wait: false,
                canary: Some(CanaryPlan {
                    steps: vec![100, 1000],
                    dwell_ms: Some(30_000),
                }),
            },
            Request::Rollback { wait: true },
            Request::Promote { wait: false },
            Request::Promote { wait: true },
            Request::Status {},
            Request::Stop {
                deadline_unix_ms: None,
            },
            Request::Handover {},
        ] {
            let line = encode(&request);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), request);
        }
    }

    /// A client from before `promote --wait` sends no `wait`: it is asked
    /// not to wait.
    #[test]
    fn a_promote_without_wait_reads_as_no_wait() {
        assert_eq!(
            decode_request(br#"{"request":"promote"}"#).unwrap(),
            Request::Promote { wait: false }
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(matches!(
            decode_request(br#"{"request":"explode"}"#),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(
            matches!(
                decode_request(br#"{"request":"reload"}"#),
                Err(DecodeError::Malformed { .. })
            ),
            "missing field"
        );
        assert!(
            matches!(
                decode_request(br#"{"request":"status","extra":1}"#),
                Err(DecodeError::Malformed { .. })
            ),
            "unknown field"
        );
        assert!(matches!(
            decode_request(b"\xff\xfe"),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode_request(b""),
            Err(DecodeError::Malformed { .. })
        ));
        let huge = vec![b' '; MAX_REQUEST];
        assert_eq!(decode_request(&huge), Err(DecodeError::TooLarge));
    }

    #[test]
    fn malformed_canary_plans_are_refused_naming_the_field() {
        // Each of these took the controller down or was shown as nonsense
        // before the edge checked plans (steps [] panicked at the first
        // step; [4000000000] showed as 40000000%).
        for (canary, says) in [
            (r#"{"steps":[]}"#, "canary.steps is empty"),
            (r#"{"steps":[0]}"#, "canary.steps[0] is 0"),
            (r#"{"steps":[4000000000]}"#, "canary.steps[0] is 4000000000"),
            (r#"{"steps":[10000]}"#, "below 10000 (100%)"),
            (
                r#"{"steps":[5000,1000],"dwell_ms":1000}"#,
                "canary.steps[1] is 1000, not above",
            ),
            (r#"{"steps":[100,1000]}"#, "canary.dwell_ms is missing"),
            (
                r#"{"steps":[1000],"dwell_ms":18446744073709551615}"#,
                "canary.dwell_ms is 18446744073709551615",
            ),
            (r#"{"steps":[1000],"dwell_ms":0}"#, "canary.dwell_ms is 0"),
            (
                r#"{"steps":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17],"dwell_ms":1000}"#,
                "at most 16",
            ),
        ] {
            let line = format!(r#"{{"request":"reload","wait":true,"canary":{canary}}}"#);
            match decode_request(line.as_bytes()) {
                Err(DecodeError::Malformed { reason }) => {
                    assert!(reason.contains(says), "{canary}: {reason}")
                }
                other => panic!("{canary} was accepted: {other:?}"),
            }
        }
        let good =
            r#"{"request":"reload","wait":true,"canary":{"steps":[100,1000],"dwell_ms":500}}"#;
        assert!(decode_request(good.as_bytes()).is_ok());
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding never panics, and anything it
        /// accepts is a request that encodes back to an equivalent line.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(request) = decode_request(&bytes) {
                let line = encode(&request);
                proptest::prop_assert_eq!(decode_request(&line[..line.len() - 1]), Ok(request));
            }
        }

        /// JSON-shaped input: objects with a `request` tag and random
        /// fields, the likeliest malformed input from a script.
        #[test]
        fn json_like_requests_decode_only_when_well_formed(
            tag in "(reload|status|stop|handover|relaod|)",
            field in "(wait|extra|)",
            value in "(true|false|1|\"x\"|null)",
        ) {
            let body = if field.is_empty() {
                format!(r#"{{"request":"{tag}"}}"#)
            } else {
                format!(r#"{{"request":"{tag}","{field}":{value}}}"#)
            };
            let expected = match (tag.as_str(), field.as_str(), value.as_str()) {
                ("reload", "wait", "true") => Some(Request::Reload { wait: true, canary: None }),
                ("reload", "wait", "false") => Some(Request::Reload { wait: false, canary: None }),
                ("status", "", _) => Some(Request::Status {}),
                ("stop", "", _) => Some(Request::Stop { deadline_unix_ms: None }),
                ("handover", "", _) => Some(Request::Handover {}),
                _ => None,
            };
            proptest::prop_assert_eq!(decode_request(body.as_bytes()).ok(), expected);
        }
    }

    #[test]
    fn only_root_and_the_owner_may_connect() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
    }
}
