//! The bytes of a one-shot mDNS question sent straight to a host's address, and the test of its
//! answer. Pure, so that it is tested without a network.
//!
//! Why not only mdns-sd: its cache answers `resolve_hostname` from records that live for their
//! TTL (120 s from avahi), so a Pi that lost power still "resolves" for two minutes. A query
//! sent by unicast from an ordinary port to the host's port 5353 is answered by the responder
//! itself, at once, as a "legacy unicast" response (RFC 6762 §6.7: it echoes our ID and
//! question), and by nobody when the host is gone: a cache-free liveness check that costs one
//! small packet each way and sends nothing to the multicast group.

/// DNS record types asked for.
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;

/// Builds the question `hostname IN A` (or `AAAA`) with `id`. `hostname` is a validated mDNS
/// name such as `rpi.local` (labels of 1 to 63 bytes).
pub fn build(id: u16, hostname: &str, ipv6: bool) -> Vec<u8> {
    let mut packet = Vec::with_capacity(HEADER_LEN + hostname.len() + 6);
    packet.extend_from_slice(&id.to_be_bytes());
    // Flags 0 (a standard query), one question, no other records.
    packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in hostname.trim_end_matches('.').split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    let qtype = if ipv6 { TYPE_AAAA } else { TYPE_A };
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&CLASS_IN.to_be_bytes());
    packet
}

/// Whether `response` answers `query`: same ID, a response without error, at least one
/// answer, and the question repeated (compared without regard to ASCII case).
pub fn answers(query: &[u8], response: &[u8]) -> bool {
    if response.len() < query.len() || query.len() < HEADER_LEN {
        return false;
    }
    let field = |p: &[u8], at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    let flags = field(response, 2);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let rcode = flags & 0xf;
    field(response, 0) == field(query, 0)
        && is_response
        && opcode == 0
        && rcode == 0
        && field(response, 4) == 1
        && field(response, 6) >= 1
        && response[HEADER_LEN..query.len()].eq_ignore_ascii_case(&query[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy unicast response as avahi 0.8 sends it (captured in the lab): the question
    /// echoed, one A record 192.0.2.10 with TTL 10.
    fn avahi_response(id: u16) -> Vec<u8> {
        let mut r = build(id, "RPI.local", false);
        r[2] = 0x84; // QR + AA
        r[7] = 1; // ANCOUNT = 1
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 10, 0, 4, 192, 0, 2, 10]);
        r
    }

    #[test]
    fn question_bytes() {
        let q = build(0x1234, "rpi.local", false);
        assert_eq!(
            q,
            [
                0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'r', b'p', b'i', 5, b'l', b'o', b'c',
                b'a', b'l', 0, 0, 1, 0, 1
            ]
        );
        assert_eq!(build(1, "rpi.local.", true)[23..25], [0, 28]);
    }

    #[test]
    fn accepts_the_echoed_answer_in_any_case() {
        let q = build(7, "rpi.local", false);
        assert!(answers(&q, &avahi_response(7)));
    }

    #[test]
    fn rejects_what_is_not_our_answer() {
        let q = build(7, "rpi.local", false);
        assert!(!answers(&q, &avahi_response(8)), "other id");
        assert!(!answers(&q, &q), "our own query is no answer");
        let mut no_answer = avahi_response(7);
        no_answer[7] = 0;
        assert!(!answers(&q, &no_answer), "no answer record");
        let mut error = avahi_response(7);
        error[3] |= 3;
        assert!(!answers(&q, &error), "NXDOMAIN");
        let other_name = build(7, "rpj.local", false);
        assert!(
            !answers(&other_name, &avahi_response(7)),
            "another question"
        );
        assert!(!answers(&q, &avahi_response(7)[..20]), "truncated");
    }

    mod malformed {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Whatever comes back (truncated, wrong types, huge TTLs, garbage), `answers`
            /// neither panics nor accepts a packet that does not echo our question.
            #[test]
            fn any_packet_is_judged_without_a_panic(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
                let q = build(7, "rpi.local", false);
                let accepted = answers(&q, &packet);
                if accepted {
                    prop_assert!(packet[12..q.len()].eq_ignore_ascii_case(&q[12..]));
                }
            }

            #[test]
            fn a_mutated_answer_is_judged_without_a_panic(at in 0..43usize, byte in any::<u8>(), cut in 0..44usize) {
                let q = build(7, "rpi.local", false);
                let mut r = avahi_response(7);
                r[at] = byte;
                r.truncate(cut.max(1));
                let _ = answers(&q, &r);
            }
        }
    }
}
