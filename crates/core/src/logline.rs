//! The instance log's record format (pure: the caller supplies times and bytes).
//!
//! A log file holds one record per line:
//!
//! ```text
//! 2026-12-03T13:31:42.123Z stdout 2 F listening on :8080
//! 2026-12-03T13:31:42.124Z stderr 2 P Password:
//! 2026-12-03T13:31:45.000Z bulkhead 2 F run 2 exited with exit code 1
//! ```
//!
//! time (RFC 3339, UTC, milliseconds), stream (`stdout`, `stderr`, or `bulkhead` for the
//! daemon's marks between runs), run (1 for the first run of the key's instance, +1 per
//! restart), `F` for a line the program ended with a newline or `P` for a part of one
//! (what one read returned without a newline; the rest follows in later records of the
//! same stream), then the bytes, which never hold a newline. Order in the file is the
//! order of arrival; within a stream it is the order the program wrote.

use std::fmt;

/// Which stream a record is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The daemon's marks: a run started, a run ended.
    Bulkhead,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Bulkhead => "bulkhead",
        }
    }

    pub fn parse(s: &str) -> Option<LogStream> {
        match s {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            "bulkhead" => Some(LogStream::Bulkhead),
            _ => None,
        }
    }
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record of an instance's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub stream: LogStream,
    pub run: u32,
    /// A part of a line (no newline followed it in that read).
    pub partial: bool,
    /// The bytes, without the newline.
    pub data: Vec<u8>,
}

/// Splits what one read of `stream` returned into records: a record per line, the last
/// one partial if the bytes did not end with a newline.
pub fn split(time_ms: u64, stream: LogStream, run: u32, bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (data, partial, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], false, &rest[i + 1..]),
            None => (rest, true, &[][..]),
        };
        out.push(Record {
            time_ms,
            stream,
            run,
            partial,
            data: data.to_vec(),
        });
        rest = next;
    }
    out
}

/// The record as one line of the file, newline included.
pub fn encode(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(
        format!(
            "{} {} {} {} ",
            crate::time::rfc3339(r.time_ms),
            r.stream,
            r.run,
            if r.partial { 'P' } else { 'F' }
        )
        .as_bytes(),
    );
    out.extend(r.data.iter().map(|b| if *b == b'\n' { b' ' } else { *b }));
    out.push(b'\n');
}

/// Reads one line of a file (without its newline). A line not in this format (a log
/// written before it existed) is a stdout line of run 0 at time 0.
pub fn decode(line: &[u8]) -> Record {
    fn parse(line: &[u8]) -> Option<Record> {
        let mut parts = line.splitn(5, |b| *b == b' ');
        let time = std::str::from_utf8(parts.next()?).ok()?;
        let stream = LogStream::parse(std::str::from_utf8(parts.next()?).ok()?)?;
        let run = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let partial = match parts.next()? {
            b"F" => false,
            b"P" => true,
            _ => return None,
        };
        let data = parts.next().unwrap_or_default().to_vec();
        Some(Record {
            time_ms: crate::time::parse_rfc3339(time)?,
            stream,
            run,
            partial,
            data,
        })
    }
    parse(line).unwrap_or_else(|| Record {
        time_ms: 0,
        stream: LogStream::Stdout,
        run: 0,
        partial: false,
        data: line.to_vec(),
    })
}

/// Every record of a file's bytes.
pub fn decode_all(bytes: &[u8]) -> Vec<Record> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(decode)
        .collect()
}

/// The last `n` lines of `records` (a line: a run of partial records and the record that
/// completes it, per stream), keeping the records' order; 0 keeps all.
pub fn tail_lines(records: Vec<Record>, n: usize) -> Vec<Record> {
    if n == 0 {
        return records;
    }
    let mut lines = 0;
    let mut start = records.len();
    // Walking back: a record ends a line of its own unless it is partial and a later
    // record of its stream (already counted) continues it; a partial record with nothing
    // after it is a line in progress, counted.
    let mut seen_later = [false; 3];
    for (i, r) in records.iter().enumerate().rev() {
        let s = r.stream as usize;
        if !r.partial || !seen_later[s] {
            if lines == n {
                break;
            }
            lines += 1;
        }
        seen_later[s] = true;
        start = i;
    }
    records.into_iter().skip(start).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_lines_and_keeps_a_partial_tail() {
        let r = split(5, LogStream::Stdout, 1, b"a\nbc\nd");
        let got: Vec<(&[u8], bool)> = r.iter().map(|r| (&r.data[..], r.partial)).collect();
        assert_eq!(got, [(&b"a"[..], false), (b"bc", false), (b"d", true)]);
        assert!(split(5, LogStream::Stdout, 1, b"").is_empty());
        assert_eq!(split(5, LogStream::Stdout, 1, b"\n")[0].data, b"");
    }

    #[test]
    fn tail_counts_lines_not_parts() {
        let mut recs = split(1, LogStream::Stdout, 1, b"one\ntw");
        recs.extend(split(2, LogStream::Stderr, 1, b"err\n"));
        recs.extend(split(3, LogStream::Stdout, 1, b"o\nthree"));
        let text = |rs: &[Record]| -> Vec<String> {
            rs.iter()
                .map(|r| String::from_utf8_lossy(&r.data).into_owned())
                .collect()
        };
        assert_eq!(text(&tail_lines(recs.clone(), 1)), ["three"]);
        assert_eq!(text(&tail_lines(recs.clone(), 2)), ["o", "three"]);
        // "tw" + "o" is one line; "err" sits between its parts.
        assert_eq!(
            text(&tail_lines(recs.clone(), 3)),
            ["tw", "err", "o", "three"]
        );
        assert_eq!(tail_lines(recs.clone(), 4).len(), 5);
        assert_eq!(tail_lines(recs.clone(), 0).len(), 5);
    }

    #[test]
    fn a_line_of_another_format_is_kept_as_stdout() {
        let r = decode(b"plain old line");
        assert_eq!(r.data, b"plain old line");
        assert_eq!((r.stream, r.run, r.time_ms), (LogStream::Stdout, 0, 0));
    }

    proptest! {
        #[test]
        fn records_round_trip(
            ms in 0u64..4_000_000_000_000,
            stream in prop_oneof![Just(LogStream::Stdout), Just(LogStream::Stderr), Just(LogStream::Bulkhead)],
            run in 0u32..1000,
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            for r in split(ms, stream, run, &data) {
                let mut line = Vec::new();
                encode(&r, &mut line);
                prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                prop_assert_eq!(decode(&line[..line.len() - 1]), r);
            }
        }

        #[test]
        fn split_then_join_gives_the_bytes_back(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut joined = Vec::new();
            for r in split(1, LogStream::Stdout, 1, &data) {
                joined.extend_from_slice(&r.data);
                if !r.partial {
                    joined.push(b'\n');
                }
            }
            prop_assert_eq!(joined, data);
        }
    }
}
