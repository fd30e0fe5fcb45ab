//! The command-line tools that ship with the daemon, one file each: `imaged send`, `imaged receive`,
//! `imaged check-config`, `imaged prune`, `imaged reload` (the unit's ExecReload=), and the hidden
//! `imaged generate-assets` the package build uses.

pub mod assets;
pub mod check_config;
pub mod prune;
pub mod receive;
pub mod reload;
pub mod send;
