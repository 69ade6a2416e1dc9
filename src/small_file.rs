//! The one way blufio reads a file it is given (configuration, token, API key, CA bundle,
//! state): a regular file of bounded size, so no file can hang start-up or a reload or fill
//! memory. A leaf module, so the files that read (config, budget, the provider client) do not
//! reach into each other for it.

use std::{io, path::Path};

/// Largest configuration, token, key or state file read, in bytes: anything bigger is the
/// wrong file (or `/dev/zero`), and reading it whole could exhaust memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a UTF-8 regular file of at most [`MAX_FILE_BYTES`]. A FIFO, a device or a directory
/// is refused by name before anything is read (opening a FIFO would wait for a writer
/// forever), and `/dev/zero`, a sparse file or a log file passed by mistake fails at once
/// instead of filling memory.
pub(crate) fn read_capped(path: &Path) -> io::Result<String> {
    String::from_utf8(read_capped_bytes(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] as bytes (a PEM bundle).
pub(crate) fn read_capped_bytes(path: &Path) -> io::Result<Vec<u8>> {
    blufio_platform::read_regular(path, MAX_FILE_BYTES)
}
