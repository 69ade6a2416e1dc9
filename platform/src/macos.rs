//! macOS: reads `task_info(MACH_TASK_BASIC_INFO)` for memory, `getrusage` for CPU time and
//! `getrlimit` for the descriptor limit.
//!
//! This file cannot be compiled on the Linux build machines (no Apple SDK there); it is
//! written against the `libc` declarations and kept deliberately small. macOS offers no cheap
//! open-descriptor count or start time, so those metrics are `None` here.

use std::{io, mem};

use crate::ProcessSample;

pub(crate) const SOURCE: &str = "mach";

#[derive(Debug)]
pub(crate) struct Reader;

impl Reader {
    pub(crate) fn new() -> io::Result<Reader> {
        Ok(Reader)
    }

    pub(crate) fn resident_bytes(&self) -> io::Result<Option<u64>> {
        basic_info().map(|info| Some(info.resident_bytes))
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
        let info = basic_info()?;
        Ok(ProcessSample {
            resident_memory_bytes: Some(info.resident_bytes),
            virtual_memory_bytes: Some(info.virtual_bytes),
            cpu_seconds: cpu_seconds(),
            open_fds: None,
            max_fds: max_fds(),
            start_time_seconds: None,
        })
    }
}

struct BasicInfo {
    resident_bytes: u64,
    virtual_bytes: u64,
}

#[allow(deprecated)] // `mach_task_self` is deprecated in libc in favour of the mach2 crate.
fn basic_info() -> io::Result<BasicInfo> {
    // SAFETY: an all-zero `mach_task_basic_info` is a valid value of this plain C struct.
    let mut info: libc::mach_task_basic_info = unsafe { mem::zeroed() };
    let mut count = libc::MACH_TASK_BASIC_INFO_COUNT;
    // SAFETY: `info` is writable and `count` holds its size in `natural_t` units, as
    // task_info requires; both outlive the call.
    let result = unsafe {
        libc::task_info(
            libc::mach_task_self(),
            libc::MACH_TASK_BASIC_INFO,
            (&raw mut info).cast::<libc::integer_t>(),
            &mut count,
        )
    };
    if result != libc::KERN_SUCCESS {
        return Err(io::Error::other(format!(
            "task_info(MACH_TASK_BASIC_INFO) failed with kern_return_t {result}"
        )));
    }
    // The struct is `repr(packed(4))`: copy fields out by value, never by reference.
    let resident_bytes = info.resident_size;
    let virtual_bytes = info.virtual_size;
    Ok(BasicInfo {
        resident_bytes,
        virtual_bytes,
    })
}

fn cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    // SAFETY: `usage` is writable and outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + f64::from(time.tv_usec) / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}
