//! `imaged generate-assets DIR` (hidden): the man pages and shell completions the package ships, generated
//! from the CLI definition so they cannot drift from it.

use std::fs;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::storage::{Context, PathError};

const CONFIG_PAGE: &str = include_str!("../../packaging/imaged.toml.5");

pub fn run(dir: &Path) -> Result<(), PathError> {
    fs::create_dir_all(dir).at("create folder", dir)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)
        .at("render the man page for", dir)?;
    write(&dir.join("imaged.8"), &page)?;
    write(&dir.join("imaged.toml.5"), CONFIG_PAGE.as_bytes())?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "imaged.bash"),
        (clap_complete::Shell::Zsh, "_imaged"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "imaged", &mut out);
        write(&dir.join(name), &out)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    fs::write(path, bytes).at("write", path)
}
