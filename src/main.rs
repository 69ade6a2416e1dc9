//! The `blufio` command line: parse arguments, load the configuration, build the context and
//! run the daemon, mapping failures to exit codes (1 runtime, 2 usage, 78 configuration).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os()) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("blufio: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match cli::execute(command) {
        Ok(code) => code,
        Err(error) => {
            let mut line = format!("blufio: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                line.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::from(if error.is_config() { 78 } else { 1 })
        }
    }
}
