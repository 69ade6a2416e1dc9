//! Fuzzes the `/proc` text parsers of `blufio-platform`: malformed text is an error, never a
//! panic or a silent 0, and accepted numbers are exactly the ones in the text.
#![no_main]

use blufio_platform::proc_text::{parse_boot_time, parse_stat, parse_statm};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a page size (a power of two from 1 B to 2^31 B, or 0); the rest is
    // the text.
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let page_size = if selector == 0 {
        0
    } else {
        1u64 << (selector % 32)
    };
    if let Ok(statm) = parse_statm(text, page_size) {
        let mut fields = text.split_ascii_whitespace();
        let size: u64 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .expect("size was parsed");
        let resident: u64 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .expect("resident was parsed");
        assert_eq!(statm.virtual_bytes, size * page_size);
        assert_eq!(statm.resident_bytes, resident * page_size);
    }
    if let Ok(stat) = parse_stat(text) {
        let after_comm = &text[text.rfind(')').expect("stat has a command") + 1..];
        let fields: Vec<&str> = after_comm.split_ascii_whitespace().collect();
        assert_eq!(Ok(stat.utime_ticks), fields[11].parse::<u64>());
        assert_eq!(Ok(stat.stime_ticks), fields[12].parse::<u64>());
        assert_eq!(Ok(stat.start_time_ticks), fields[19].parse::<u64>());
    }
    if let Some(boot_time) = parse_boot_time(text) {
        let line = text.lines().find_map(|line| line.strip_prefix("btime "));
        assert_eq!(
            line.map(|value| value.trim().parse::<u64>()),
            Some(Ok(boot_time))
        );
    }
});
