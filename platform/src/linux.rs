//! Linux: reads `/proc/self/statm`, `/proc/self/stat`, `/proc/stat` and `/proc/self/fd`.
//!
//! The page size and clock tick rate come from `sysconf` once per reader, never a constant:
//! Raspberry Pi 5 kernels use 16 KiB pages and some arm64 servers 64 KiB. All byte counts are
//! `u64` so a 32-bit build cannot overflow at 4 GiB.

use std::{fs, io};

use crate::ProcessSample;

pub(crate) const SOURCE: &str = "statm";

#[derive(Debug)]
pub(crate) struct Reader {
    page_size: u64,
}

impl Reader {
    pub(crate) fn new() -> io::Result<Reader> {
        Ok(Reader {
            page_size: sysconf(libc::_SC_PAGESIZE, "_SC_PAGESIZE")?,
        })
    }

    pub(crate) fn resident_bytes(&self) -> io::Result<Option<u64>> {
        let text = fs::read_to_string("/proc/self/statm")?;
        parse_statm(&text, self.page_size).map(|statm| Some(statm.resident_bytes))
    }

    pub(crate) fn page_size(&self) -> Option<u64> {
        Some(self.page_size)
    }
}

#[derive(Debug)]
pub(crate) struct ProcessReader {
    page_size: u64,
    ticks_per_second: u64,
    boot_time_seconds: Option<u64>,
}

impl ProcessReader {
    pub(crate) fn new() -> io::Result<ProcessReader> {
        // Boot time never changes, so it is read once; a kernel without it only loses the
        // start-time metric.
        let boot_time_seconds = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_boot_time(&text));
        Ok(ProcessReader {
            page_size: sysconf(libc::_SC_PAGESIZE, "_SC_PAGESIZE")?,
            ticks_per_second: sysconf(libc::_SC_CLK_TCK, "_SC_CLK_TCK")?,
            boot_time_seconds,
        })
    }

    pub(crate) fn sample(&self) -> io::Result<ProcessSample> {
        let statm = parse_statm(&fs::read_to_string("/proc/self/statm")?, self.page_size)?;
        let stat = parse_stat(&fs::read_to_string("/proc/self/stat")?)?;
        let ticks = self.ticks_per_second as f64;
        let open_fds = fs::read_dir("/proc/self/fd")
            .map(|entries| entries.count() as u64)
            .ok();
        Ok(ProcessSample {
            resident_memory_bytes: Some(statm.resident_bytes),
            virtual_memory_bytes: Some(statm.virtual_bytes),
            cpu_seconds: Some((stat.utime_ticks + stat.stime_ticks) as f64 / ticks),
            open_fds,
            max_fds: max_fds(),
            start_time_seconds: self
                .boot_time_seconds
                .map(|boot| boot as f64 + stat.start_time_ticks as f64 / ticks),
        })
    }
}

/// The two fields of `/proc/self/statm` that blufio uses, already in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statm {
    /// Virtual size in bytes.
    pub virtual_bytes: u64,
    /// Resident size in bytes.
    pub resident_bytes: u64,
}

/// Parses `/proc/self/statm` ("size resident shared text lib data dt", in pages).
pub fn parse_statm(text: &str, page_size: u64) -> io::Result<Statm> {
    let mut fields = text.split_ascii_whitespace();
    let mut next_pages = |name: &str| -> io::Result<u64> {
        let field = fields
            .next()
            .ok_or_else(|| invalid(format!("statm has no {name} field: {text:?}")))?;
        field
            .parse::<u64>()
            .map_err(|_| invalid(format!("statm {name} field is not a number: {field:?}")))
    };
    let size_pages = next_pages("size")?;
    let resident_pages = next_pages("resident")?;
    let bytes = |pages: u64, name: &str| {
        pages
            .checked_mul(page_size)
            .ok_or_else(|| invalid(format!("statm {name} overflows: {pages} pages")))
    };
    Ok(Statm {
        virtual_bytes: bytes(size_pages, "size")?,
        resident_bytes: bytes(resident_pages, "resident")?,
    })
}

/// The fields of `/proc/self/stat` that blufio uses, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User CPU time.
    pub utime_ticks: u64,
    /// System CPU time.
    pub stime_ticks: u64,
    /// Start time after boot.
    pub start_time_ticks: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> io::Result<Stat> {
    let after_comm = text
        .rfind(')')
        .and_then(|end| text.get(end + 1..))
        .ok_or_else(|| invalid(format!("stat has no command field: {text:?}")))?;
    // Fields after the command start at field 3 (state); utime is field 14.
    let fields: Vec<&str> = after_comm.split_ascii_whitespace().collect();
    let field = |number: usize, name: &str| -> io::Result<u64> {
        let value = fields
            .get(number - 3)
            .ok_or_else(|| invalid(format!("stat has no {name} field")))?;
        value
            .parse::<u64>()
            .map_err(|_| invalid(format!("stat {name} field is not a number: {value:?}")))
    };
    Ok(Stat {
        utime_ticks: field(14, "utime")?,
        stime_ticks: field(15, "stime")?,
        start_time_ticks: field(22, "starttime")?,
    })
}

/// Finds the `btime` line (boot time, seconds since the epoch) in `/proc/stat`.
pub fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` that outlives the call.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if result != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // `rlim_t` is 32 bits on some 32-bit targets and 64 on others.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(limit.rlim_cur))
}

fn sysconf(name: libc::c_int, label: &str) -> io::Result<u64> {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let value = unsafe { libc::sysconf(name) };
    if value <= 0 {
        return Err(io::Error::other(format!(
            "sysconf({label}) failed: {}",
            io::Error::last_os_error()
        )));
    }
    u64::try_from(value).map_err(|_| invalid(format!("sysconf({label}) returned {value}")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_resident_is_second_field_times_page_size() {
        for page_size in [4096, 16 * 1024, 64 * 1024] {
            let statm = parse_statm("2000 300 100 10 0 500 0\n", page_size).unwrap();
            assert_eq!(statm.resident_bytes, 300 * page_size);
            assert_eq!(statm.virtual_bytes, 2000 * page_size);
        }
    }

    #[test]
    fn statm_beyond_four_gib_does_not_overflow() {
        // 5 GiB of 64 KiB pages: would wrap in a 32-bit usize.
        let statm = parse_statm("81920 81920 0 0 0 0 0", 64 * 1024).unwrap();
        assert_eq!(statm.resident_bytes, 5 * 1024 * 1024 * 1024);
    }

    #[test]
    fn malformed_statm_is_an_error_not_zero() {
        for text in ["", "12", "12 abc 3", "-1 -2"] {
            let error = parse_statm(text, 4096).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{text:?}");
        }
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let text = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 98765 12345678 300 18446744073709551615";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.utime_ticks, 250);
        assert_eq!(stat.stime_ticks, 50);
        assert_eq!(stat.start_time_ticks, 98765);
    }

    #[test]
    fn truncated_stat_is_an_error() {
        assert!(parse_stat("1234 (x) S 1 2 3").is_err());
        assert!(parse_stat("no parenthesis").is_err());
    }

    #[test]
    fn boot_time_is_read_from_btime_line() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_700_000_000));
        assert_eq!(parse_boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn real_reader_sees_this_process() {
        let reader = crate::RssReader::new().unwrap();
        let resident = reader.resident_bytes().unwrap().unwrap();
        assert!(resident > 0);
        assert_eq!(resident % reader.page_size().unwrap(), 0);
        let sample = crate::ProcessReader::new().unwrap().sample().unwrap();
        assert!(sample.virtual_memory_bytes.unwrap() >= sample.resident_memory_bytes.unwrap());
        assert!(sample.open_fds.unwrap() >= 3);
        assert!(sample.start_time_seconds.unwrap() > 1_000_000_000.0);
    }
}
