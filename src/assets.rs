//! `imaged generate-assets DIR` (hidden): the man pages and shell completions the package ships, generated
//! from the CLI definition so they cannot drift from it.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::Cli;

const CONFIG_PAGE: &str = include_str!("../packaging/imaged.toml.5");

pub fn run(dir: &Path) -> ExitCode {
    match write_all(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imaged: cannot write assets to {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join("imaged.8"), page)?;
    std::fs::write(dir.join("imaged.toml.5"), CONFIG_PAGE)?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "imaged.bash"),
        (clap_complete::Shell::Zsh, "_imaged"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "imaged", &mut out);
        std::fs::write(dir.join(name), out)?;
    }
    Ok(())
}
