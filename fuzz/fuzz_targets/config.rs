//! Fuzzes `Config::parse_validated` (parsing and validation, as `Config::load` runs them):
//! any text gives a `Config` that holds the validation rules, or an error that names the file;
//! never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A token file makes parsing read the file system; the tests cover that, not the fuzzer.
    if text.contains("token_file") {
        return;
    }
    let path = Path::new("/fuzz/blufio.toml");
    match blufio::Config::parse_validated(text, path) {
        Ok(config) => {
            // Parsing is a pure function of the text: the same text gives the same result.
            let again =
                blufio::Config::parse_validated(text, path).expect("parsed once, parses twice");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
            // Validation holds for whatever was accepted.
            assert!(0 < config.daemon.memory_warn_mb);
            assert!(config.daemon.memory_warn_mb < config.daemon.memory_limit_mb);
            assert!((1..=3600).contains(&config.daemon.monitor_interval_secs));
            assert!(config.agent.budget_usd.is_none());
            assert!(config.gateway.max_message_bytes > 0 && config.gateway.max_sessions > 0);
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            assert!(
                message.contains("/fuzz/blufio.toml"),
                "error without the file: {message}"
            );
        }
    }
});
