//! `imaged send`: publish JPEG files on the upload topic.

use std::process::ExitCode;

use crate::cli::SendArgs;
use crate::config::Config;

pub fn run(_config: Config, _args: SendArgs) -> ExitCode {
    ExitCode::FAILURE
}
