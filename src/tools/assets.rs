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

#[cfg(test)]
mod tests {
    use super::CONFIG_PAGE;

    #[test]
    fn the_config_page_gives_each_default_as_the_shipped_config_sets_it() {
        let shipped: toml::Table = include_str!("../../config/imaged.toml").parse().unwrap();
        let mut section = "";
        let mut checked = 0;
        for line in CONFIG_PAGE.lines() {
            if let Some(name) = line
                .strip_prefix(".SH \"SECTION [")
                .and_then(|l| l.strip_suffix("]\""))
            {
                section = name;
                continue;
            }
            let Some((key, doc)) = line.strip_prefix(".BR ").and_then(|l| l.split_once(' ')) else {
                continue;
            };
            let Some((_, default)) = doc.split_once("default") else {
                continue;
            };
            let Some(value) = shipped.get(section).and_then(|t| t.get(key)) else {
                continue;
            };
            // The page quotes and escapes for roff, and may go on after the value ("; applied by a reload").
            let shown: String = default
                .replace("\\(dq", "")
                .replace("\\-", "-")
                .chars()
                .filter(|c| !matches!(c, '"' | ' ' | ')'))
                .collect();
            let want = match value {
                toml::Value::String(s) => s.replace(' ', ""),
                v => v.to_string(),
            };
            assert!(
                shown.starts_with(&want),
                "imaged.toml(5), [{section}] {key}: default{default}; config/imaged.toml: {want}"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} defaults found in the page");
    }
}
