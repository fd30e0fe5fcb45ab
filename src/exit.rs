//! The exit codes of every command, named once. Each command's error says which one it is; `main` turns it
//! into the process's exit status.

/// Why a command failed, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It ran and did not do all it was asked (an image not sent, a broker that cannot be reached).
    Failure = 1,
    /// The command line asks for something that cannot be done (an invalid `--topic`).
    Usage = 2,
    /// The config file is invalid (sysexits' EX_CONFIG): the unit's `RestartPreventExitStatus=78` keeps
    /// systemd from restarting a daemon that would fail the same way again.
    Config = 78,
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit as u8)
    }
}
