//! The hand-over protocol between the docker driver and its warm-slot init (std only: this
//! file is compiled into the driver and, on its own, into the static init).
//!
//! The driver listens on a Unix socket in the slot's directory; the init connects once
//! at its start and waits. At the launch the driver sends one message:
//!
//! ```text
//! "BKW1"  u32 body length (LE, at most MAX_BODY)
//! body:   u32 argc, then argc × (u32 length, bytes)       argv, argv[0] the program
//!         u32 envc, then envc × (u32 length, bytes)       "NAME=value"
//! ```
//!
//! No string may hold a NUL byte; argv is not empty; an environment entry has a name
//! before its `=`; at most MAX_ITEMS strings per list. The init answers one byte,
//! [`REPLY_STARTING`] (the message was good; it execs next) or [`REPLY_BAD_MESSAGE`],
//! and, if the exec fails, [`REPLY_EXEC_FAILED`] and the errno (i32 LE) before exiting
//! 127. A successful exec closes the connection (close-on-exec): the driver reads the
//! end of the stream.

use std::io::{self, Read};

/// The first bytes of a message.
pub const MAGIC: [u8; 4] = *b"BKW1";
/// The largest body accepted (the kernel's own limit on argv + environment is lower).
pub const MAX_BODY: u32 = 4 << 20;
/// The most strings in argv, or in the environment.
pub const MAX_ITEMS: u32 = 1 << 16;
/// The message was decoded: the init execs the program now.
pub const REPLY_STARTING: u8 = 0;
/// The exec failed; an i32 errno (LE) follows.
pub const REPLY_EXEC_FAILED: u8 = 1;
/// The message could not be decoded.
pub const REPLY_BAD_MESSAGE: u8 = 2;

/// What the init is handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub argv: Vec<Vec<u8>>,
    /// `NAME=value` entries.
    pub env: Vec<Vec<u8>>,
}

fn check_list(items: &[&[u8]], env: bool) -> Result<(), &'static str> {
    if items.len() > MAX_ITEMS as usize {
        return Err("too many strings");
    }
    for it in items {
        if it.contains(&0) {
            return Err("a string holds a NUL byte");
        }
        if env && !it.iter().skip(1).any(|&b| b == b'=') {
            return Err("an environment entry has no NAME=");
        }
    }
    Ok(())
}

/// The whole message (header and body) for `argv` and `env` (`NAME=value` entries).
pub fn encode(argv: &[&[u8]], env: &[&[u8]]) -> Result<Vec<u8>, &'static str> {
    if argv.is_empty() {
        return Err("argv is empty");
    }
    check_list(argv, false)?;
    check_list(env, true)?;
    let body_len: usize = 8 + argv.iter().chain(env).map(|s| 4 + s.len()).sum::<usize>();
    if body_len > MAX_BODY as usize {
        return Err("the message is too long");
    }
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    for list in [argv, env] {
        out.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for s in list {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
    }
    Ok(out)
}

/// The body length a header announces.
pub fn header(h: &[u8; 8]) -> Result<u32, &'static str> {
    if h[..4] != MAGIC {
        return Err("bad magic");
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_BODY {
        return Err("the message is too long");
    }
    Ok(len)
}

/// Decodes a body (what follows the header).
pub fn decode(body: &[u8]) -> Result<Message, &'static str> {
    let mut at = 0usize;
    let u32_at = |at: &mut usize| -> Result<u32, &'static str> {
        let b = body.get(*at..*at + 4).ok_or("the message is cut short")?;
        *at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut lists: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        let n = u32_at(&mut at)?;
        if n > MAX_ITEMS {
            return Err("too many strings");
        }
        for _ in 0..n {
            let len = u32_at(&mut at)? as usize;
            let s = body
                .get(at..at.checked_add(len).ok_or("the message is cut short")?)
                .ok_or("the message is cut short")?;
            at += len;
            list.push(s.to_vec());
        }
    }
    if at != body.len() {
        return Err("trailing bytes after the message");
    }
    let [argv, env] = lists;
    if argv.is_empty() {
        return Err("argv is empty");
    }
    check_list(&refs(&argv), false)?;
    check_list(&refs(&env), true)?;
    Ok(Message { argv, env })
}

fn refs(l: &[Vec<u8>]) -> Vec<&[u8]> {
    l.iter().map(Vec::as_slice).collect()
}

/// Reads one message. `Ok(None)`: the stream ended before its first byte (the driver
/// went away); an `InvalidData` error: a malformed message.
pub fn read_message(r: &mut impl Read) -> io::Result<Option<Message>> {
    let mut h = [0u8; 8];
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bad = |e: &'static str| io::Error::new(io::ErrorKind::InvalidData, e);
    let len = header(&h).map_err(bad)?;
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    decode(&body).map(Some).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(argv: &[&[u8]], env: &[&[u8]]) -> Message {
        let wire = encode(argv, env).unwrap();
        read_message(&mut &wire[..]).unwrap().unwrap()
    }

    #[test]
    fn a_message_round_trips_with_empty_and_spaced_strings() {
        let m = round(
            &[b"/bin/sh", b"-c", b"", b"a b"],
            &[b"A=1", b"EMPTY=", b"S=a  b"],
        );
        assert_eq!(m.argv, [&b"/bin/sh"[..], b"-c", b"", b"a b"]);
        assert_eq!(m.env, [&b"A=1"[..], b"EMPTY=", b"S=a  b"]);
        assert!(round(&[b"x"], &[]).env.is_empty());
    }

    #[test]
    fn the_wire_format_is_the_documented_one() {
        let wire = encode(&[b"ab"], &[b"K=v"]).unwrap();
        let mut want = b"BKW1".to_vec();
        want.extend_from_slice(&21u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"K=v");
        assert_eq!(wire, want);
    }

    #[test]
    fn encode_refuses_what_exec_cannot_take() {
        assert_eq!(encode(&[], &[]), Err("argv is empty"));
        assert_eq!(encode(&[b"a\0b"], &[]), Err("a string holds a NUL byte"));
        assert_eq!(
            encode(&[b"a"], &[b"NOEQUALS"]),
            Err("an environment entry has no NAME=")
        );
        assert_eq!(
            encode(&[b"a"], &[b"=x"]),
            Err("an environment entry has no NAME=")
        );
        let big = vec![b'x'; MAX_BODY as usize];
        assert_eq!(encode(&[&big], &[]), Err("the message is too long"));
    }

    #[test]
    fn decode_refuses_malformed_bodies() {
        let wire = encode(&[b"prog", b"arg"], &[b"A=1"]).unwrap();
        let body = &wire[8..];
        // Every truncation is refused, never a panic.
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err("trailing bytes after the message"));
        // A length that points past the end.
        let mut huge = body.to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
        // Too many items.
        assert_eq!(
            decode(&(MAX_ITEMS + 1).to_le_bytes()),
            Err("too many strings")
        );
        // A NUL smuggled in past the encoder.
        let mut nul = body.to_vec();
        nul[8] = 0;
        assert_eq!(decode(&nul), Err("a string holds a NUL byte"));
    }

    #[test]
    fn headers_are_checked() {
        let mut h = *b"BKW1\0\0\0\0";
        assert_eq!(header(&h), Ok(0));
        h[4..].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(header(&h), Err("the message is too long"));
        assert_eq!(header(b"XXXX\0\0\0\0"), Err("bad magic"));
        assert!(read_message(&mut &b""[..]).unwrap().is_none());
        assert!(read_message(&mut &b"BKW"[..]).is_err());
    }
}
