//! The no-op reader for systems without a supported source: every reading is `None`.
//!
//! Also selected by the `force-fallback` feature so CI can test this path on Linux.

use std::io;

use crate::ProcessSample;

pub(crate) const SOURCE: &str = "none";

#[derive(Debug)]
pub(crate) struct Reader;

impl Reader {
    pub(crate) fn new() -> io::Result<Reader> {
        Ok(Reader)
    }

    pub(crate) fn resident_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    pub(crate) fn page_size(&self) -> Option<u64> {
        None
    }
}

#[derive(Debug)]
pub(crate) struct ProcessReader;

impl ProcessReader {
    pub(crate) fn new() -> io::Result<ProcessReader> {
        Ok(ProcessReader)
    }

    pub(crate) fn sample(&self) -> io::Result<ProcessSample> {
        Ok(ProcessSample::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_reports_no_readings_rather_than_zero() {
        assert_eq!(Reader::new().unwrap().resident_bytes().unwrap(), None);
        assert_eq!(
            ProcessReader::new().unwrap().sample().unwrap(),
            ProcessSample::default()
        );
        assert_eq!(crate::RssReader::new().unwrap().source(), "none");
    }
}
