//! `imaged receive`: save the images republished on the stored topic.

use std::process::ExitCode;

use crate::cli::ReceiveArgs;
use crate::config::Config;

pub fn run(_config: Config, _args: ReceiveArgs) -> ExitCode {
    ExitCode::FAILURE
}
