//! A minimal ustar writer for build contexts: regular files only (directories are implied
//! by the paths, which the engine accepts). Names longer than 100 bytes use the ustar
//! prefix field (up to 255 bytes in all).

/// Builds a tar archive in memory.
pub struct TarBuilder {
    buf: Vec<u8>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder { buf: Vec::new() }
    }

    /// Appends a regular file. Names that do not fit ustar are skipped with a warning.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        let mut h = [0u8; 512];
        let (prefix, name_part) = if name.len() <= 100 {
            ("", name)
        } else {
            match name[..name.len().min(156)].rfind('/') {
                Some(i) if name.len() - i - 1 <= 100 => (&name[..i], &name[i + 1..]),
                _ => {
                    tracing::warn!("build context: {name} is too long for tar, skipped");
                    return;
                }
            }
        };
        h[..name_part.len()].copy_from_slice(name_part.as_bytes());
        let octal = |h: &mut [u8], at: usize, width: usize, v: u64| {
            let s = format!("{v:0w$o}", w = width - 1);
            h[at..at + width - 1].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    /// The archive, with its two zero end blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_tar_reads_it() {
        let mut t = TarBuilder::new();
        t.file("Dockerfile", 0o644, b"FROM scratch\n");
        t.file("dir/run.sh", 0o755, b"#!/bin/sh\necho hi\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, t.finish()).unwrap();
        let Ok(out) = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
        else {
            eprintln!("skipped: no tar");
            return;
        };
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            list.contains("Dockerfile") && list.contains("dir/run.sh"),
            "{list}"
        );
        assert!(list.contains("rwxr-xr-x"), "{list}");
    }
}
