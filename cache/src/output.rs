//! What a compile produced, as the payload of a result entry: exit code, stdout, stderr and the
//! output files, in a hand-written binary encoding so the bytes are stable across serde
//! versions and every length is checked on the way back in.
//!
//! Layout (integers little-endian): `u32 version (1)`, `i32 exit code`, `u64 compile milliseconds`, `u64 len ‖ stdout`,
//! `u64 len ‖ stderr`, `u32 file count`, then per file `u32 len ‖ utf-8 path`,
//! `u8 executable (0 or 1)`, `u64 len ‖ bytes`. Nothing may follow.

use std::fmt;

use bytes::Bytes;

use crate::entry::EntryError;

/// Everything a cache hit must replay: the exit code, the streams byte for byte, and the files.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CompileOutput {
    /// Replayed as the wrapper's exit code (cached failures are clean compiler errors only).
    pub exit_code: i32,
    /// How long the compile took where it ran: what a hit saves, for `ferry stats`.
    pub compile_ms: u64,
    /// Replayed verbatim: cargo reads JSON artifact notifications from it.
    pub stdout: Vec<u8>,
    /// Replayed verbatim: diagnostics must look the same on a hit.
    pub stderr: Vec<u8>,
    /// The declared outputs, written back on a hit.
    pub files: Vec<OutputFile>,
}

/// One output file of a compile.
#[derive(Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// Where the compile wrote it, as the compile named it (the client resolves and checks it).
    pub path: String,
    /// Restored as the executable bit, so cached binaries and build scripts still run.
    pub executable: bool,
    /// The file's content; a slice of the decoded entry's buffer (no copy on a hit).
    pub bytes: Bytes,
}

const OUTPUT_VERSION: u32 = 1;

impl CompileOutput {
    /// Serializes the output; [`CompileOutput::decode`] reverses it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// The length of [`CompileOutput::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        let files_len: usize = self.files.iter().map(|f| 4 + f.path.len() + 1 + 8 + f.bytes.len()).sum();
        4 + 4 + 8 + 8 + self.stdout.len() + 8 + self.stderr.len() + 4 + files_len
    }

    /// Appends [`CompileOutput::encode`]'s bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&OUTPUT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.exit_code.to_le_bytes());
        out.extend_from_slice(&self.compile_ms.to_le_bytes());
        for stream in [&self.stdout, &self.stderr] {
            out.extend_from_slice(&(stream.len() as u64).to_le_bytes());
            out.extend_from_slice(stream);
        }
        let count = u32::try_from(self.files.len()).expect("fewer than 2^32 output files");
        out.extend_from_slice(&count.to_le_bytes());
        for file in &self.files {
            let path_len = u32::try_from(file.path.len()).expect("a path shorter than 4 GiB");
            out.extend_from_slice(&path_len.to_le_bytes());
            out.extend_from_slice(file.path.as_bytes());
            out.push(u8::from(file.executable));
            out.extend_from_slice(&(file.bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(&file.bytes);
        }
        debug_assert_eq!(out.len() - start, self.encoded_len());
    }

    /// Parses an encoded output, rejecting truncation, bad values and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        Self::decode_shared(Bytes::copy_from_slice(bytes))
    }

    /// [`CompileOutput::decode`] without copying: the files are slices of `shared`.
    pub fn decode_shared(shared: Bytes) -> Result<Self, EntryError> {
        let bytes: &[u8] = &shared;
        let mut r = Reader { bytes, pos: 0 };
        let version = u32::from_le_bytes(r.array("version")?);
        if version != OUTPUT_VERSION {
            return Err(EntryError::UnsupportedVersion { what: "compile output", version });
        }
        let exit_code = i32::from_le_bytes(r.array("exit code")?);
        let compile_ms = u64::from_le_bytes(r.array("compile time")?);
        let stdout = r.bytes_u64("stdout")?.to_vec();
        let stderr = r.bytes_u64("stderr")?.to_vec();
        let count = u32::from_le_bytes(r.array("file count")?);
        // Each file takes at least 13 bytes, so a huge count cannot reserve much.
        let mut files = Vec::with_capacity((count as usize).min(r.remaining() / 13));
        for _ in 0..count {
            let path_len = u32::from_le_bytes(r.array("path length")?);
            let at = r.pos;
            let path = std::str::from_utf8(r.take(path_len as usize, "path")?)
                .map_err(|_| EntryError::Invalid { what: "utf-8 path", offset: at })?
                .to_owned();
            let at = r.pos;
            let executable = match r.array::<1>("executable flag")? {
                [0] => false,
                [1] => true,
                _ => {
                    return Err(EntryError::Invalid { what: "executable flag", offset: at });
                }
            };
            let content = r.bytes_u64("file bytes")?;
            let start = content.as_ptr() as usize - bytes.as_ptr() as usize;
            files.push(OutputFile { path, executable, bytes: shared.slice(start..start + content.len()) });
        }
        if r.remaining() > 0 {
            return Err(EntryError::TrailingBytes { count: r.remaining() });
        }
        Ok(CompileOutput { exit_code, compile_ms, stdout, stderr, files })
    }
}

impl fmt::Debug for CompileOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompileOutput")
            .field("exit_code", &self.exit_code)
            .field("compile_ms", &self.compile_ms)
            .field("stdout_len", &self.stdout.len())
            .field("stderr_len", &self.stderr.len())
            .field("files", &self.files)
            .finish()
    }
}

impl fmt::Debug for OutputFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputFile")
            .field("path", &self.path)
            .field("executable", &self.executable)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// A cursor that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], EntryError> {
        if len > self.remaining() {
            return Err(EntryError::Truncated { what, offset: self.pos });
        }
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], EntryError> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    /// A `u64` length followed by that many bytes.
    fn bytes_u64(&mut self, what: &'static str) -> Result<&'a [u8], EntryError> {
        let at = self.pos;
        let len = u64::from_le_bytes(self.array(what)?);
        let len = usize::try_from(len).map_err(|_| EntryError::Truncated { what, offset: at })?;
        self.take(len, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> CompileOutput {
        CompileOutput {
            exit_code: -3,
            compile_ms: 1234,
            stdout: b"{\"reason\":\"compiler-artifact\"}\n".to_vec(),
            stderr: b"warning: unused".to_vec(),
            files: vec![
                OutputFile {
                    path: "target/debug/deps/libfoo-1234.rlib".to_owned(),
                    executable: false,
                    bytes: vec![1, 2, 3, 4, 5].into(),
                },
                OutputFile {
                    path: "build/bar/build_script_build-99".to_owned(),
                    executable: true,
                    bytes: Bytes::new(),
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        for output in [example(), CompileOutput::default()] {
            assert_eq!(CompileOutput::decode(&output.encode()), Ok(output));
        }
    }

    #[test]
    fn every_truncation_and_trailing_bytes_are_rejected() {
        let bytes = example().encode();
        for len in 0..bytes.len() {
            assert!(CompileOutput::decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(CompileOutput::decode(&longer), Err(EntryError::TrailingBytes { count: 1 }));
    }

    #[test]
    fn malformed_fields_are_rejected() {
        let bytes = example().encode();
        let stdout_end = 24 + example().stdout.len();
        let stderr_end = stdout_end + 8 + example().stderr.len();
        let path_at = stderr_end + 4 + 4;
        let flag_at = path_at + example().files[0].path.len();
        let check = |edit: &dyn Fn(&mut Vec<u8>), expected: &str| {
            let mut bad = bytes.clone();
            edit(&mut bad);
            assert_eq!(CompileOutput::decode(&bad).unwrap_err().to_string(), expected);
        };
        check(&|b| b[0] = 2, "unsupported compile output format version 2");
        check(&|b| b[16..24].fill(0xff), "truncated stdout at byte 24");
        check(&|b| b[16] += 1, "truncated stderr at byte 64");
        check(&|b| b[stderr_end] = 3, &format!("truncated path length at byte {}", bytes.len()));
        check(&|b| b[stderr_end] = 1, &format!("{} unexpected trailing bytes", bytes.len() - flag_at - 1 - 8 - 5));
        check(&|b| b[path_at] = 0xff, &format!("invalid utf-8 path at byte {path_at}"));
        check(&|b| b[flag_at] = 2, &format!("invalid executable flag at byte {flag_at}"));
    }

    #[test]
    fn debug_prints_lengths_not_bytes() {
        let text = format!("{:?}", example());
        assert_eq!(
            text,
            "CompileOutput { exit_code: -3, compile_ms: 1234, stdout_len: 31, stderr_len: 15, files: [\
             OutputFile { path: \"target/debug/deps/libfoo-1234.rlib\", executable: false, len: 5 }, \
             OutputFile { path: \"build/bar/build_script_build-99\", executable: true, len: 0 }] }"
        );
    }
}
