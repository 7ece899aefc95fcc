//! The DNS messages reloader writes, in one place (RFC 1035 §4.1): the
//! readiness probe's query (`dns://`, type A, class IN, recursion not
//! desired) and its check that the answer is a response to it with rcode
//! NOERROR; the demo server's empty NOERROR answer. The tests and the
//! benchmark build their queries here too (with type TXT).

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type TXT.
pub const TYPE_TXT: u16 = 16;

/// A query for `name` of record type `qtype`, class IN, with message id
/// `id`.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut message = Vec::with_capacity(18 + name.len());
    message.extend_from_slice(&id.to_be_bytes());
    // QR=0 (query), OPCODE=0, RD=0; one question.
    message.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.to_be_bytes());
    // QCLASS IN.
    message.extend_from_slice(&[0x00, 0x01]);
    message
}

/// An empty NOERROR answer to `query` (its header and question echoed),
/// or `None` when it is too short to be a DNS message.
pub fn empty_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut answer = query.to_vec();
    answer[2] |= 0x80; // QR: a response
    answer[3] &= 0xf0; // rcode NOERROR
    Some(answer)
}

/// Whether `answer` is a response to query `id` with rcode NOERROR; `Err`
/// says what it is instead.
pub fn check_answer(id: u16, answer: &[u8]) -> Result<(), String> {
    if answer.len() < 12 {
        return Err(format!("a {}-byte reply is no DNS message", answer.len()));
    }
    if u16::from_be_bytes([answer[0], answer[1]]) != id {
        return Err("the reply answers another query".into());
    }
    if answer[2] & 0x80 == 0 {
        return Err("the reply is a query, not a response".into());
    }
    match answer[3] & 0x0f {
        0 => Ok(()),
        rcode => Err(format!(
            "the response's rcode is {rcode} ({})",
            match rcode {
                1 => "FORMERR",
                2 => "SERVFAIL",
                3 => "NXDOMAIN",
                4 => "NOTIMP",
                5 => "REFUSED",
                _ => "other",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_encodes_its_name_in_labels() {
        let q = query(0x1234, "gen.test", TYPE_A);
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[4..6], &[0, 1], "one question");
        assert_eq!(&q[12..], b"\x03gen\x04test\x00\x00\x01\x00\x01");
        assert_eq!(query(1, "gen.test.", TYPE_A), query(1, "gen.test", TYPE_A));
        let txt = query(1, "gen.test", TYPE_TXT);
        assert_eq!(&txt[txt.len() - 4..], &[0, 16, 0, 1]);
    }

    #[test]
    fn the_empty_answer_echoes_the_query_as_a_noerror_response() {
        let q = query(5, "a.test", TYPE_A);
        let answer = empty_answer(&q).unwrap();
        assert_eq!(check_answer(5, &answer), Ok(()));
        assert_eq!(&answer[12..], &q[12..]);
        assert_eq!(empty_answer(b"short"), None);
    }

    #[test]
    fn answers_are_checked_for_id_kind_and_rcode() {
        let mut reply = query(7, "a.test", TYPE_A);
        reply[2] |= 0x80;
        assert_eq!(check_answer(7, &reply), Ok(()));
        assert!(
            check_answer(8, &reply)
                .unwrap_err()
                .contains("another query")
        );
        let mut nx = reply.clone();
        nx[3] |= 3;
        assert!(check_answer(7, &nx).unwrap_err().contains("NXDOMAIN"));
        assert!(
            check_answer(7, &query(7, "a.test", TYPE_A))
                .unwrap_err()
                .contains("not a response")
        );
        assert!(check_answer(7, b"x").is_err());
    }
}
