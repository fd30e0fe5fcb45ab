//! The filesystems measured: the folder given (`--dir`), and a journaled ext4 and an xfs, each made by the
//! harness in a sparse image file beside that folder and loop-mounted (needs root; skipped with a line
//! otherwise). Every disk-touching measurement of a size runs on each of them in turn, in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsKind {
    /// The folder given with --dir, as it is.
    Dir,
    /// ext4 with its default journal (data=ordered), loop-mounted.
    Ext4,
    /// xfs, loop-mounted.
    Xfs,
}

/// One filesystem under test; a loop-mounted one is unmounted and its image removed on drop.
pub struct Fs {
    pub label: String,
    /// Where scratch folders go.
    pub dir: PathBuf,
    mount: Option<(PathBuf, PathBuf)>,
}

impl Fs {
    pub fn given(dir: &Path) -> Fs {
        Fs {
            label: format!("{} ({})", fstype(dir), dir.display()),
            dir: dir.to_path_buf(),
            mount: None,
        }
    }

    /// Makes a fresh filesystem of `kind` in a sparse file of `gib` GiB in `base` and mounts it.
    pub fn make(kind: FsKind, base: &Path, gib: u64) -> Result<Fs, String> {
        let (name, mkfs, args): (&str, &str, &[&str]) = match kind {
            FsKind::Dir => return Ok(Fs::given(base)),
            FsKind::Ext4 => (
                "ext4 journaled",
                "mkfs.ext4",
                &["-q", "-F", "-O", "has_journal"],
            ),
            FsKind::Xfs => ("xfs", "mkfs.xfs", &["-q", "-f"]),
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!(
                "{name}: SKIP: mounting a loop filesystem needs root"
            ));
        }
        if !command_exists(mkfs) {
            return Err(format!(
                "{name}: SKIP: {mkfs} is missing (make bench-deps installs it)"
            ));
        }
        let stem = format!("imaged-bench-{}-{}", &mkfs[5..], std::process::id());
        let image = base.join(format!("{stem}.img"));
        let mountpoint = base.join(format!("{stem}.mnt"));
        let file = std::fs::File::create(&image).map_err(|e| format!("{name}: {e}"))?;
        file.set_len(gib << 30)
            .map_err(|e| format!("{name}: {e}"))?;
        drop(file);
        std::fs::create_dir_all(&mountpoint).map_err(|e| format!("{name}: {e}"))?;
        let made = run(Command::new(mkfs).args(args).arg(&image))
            .map_err(|e| format!("{name}: SKIP: {mkfs}: {e}"))
            .and_then(|()| {
                run(Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&mountpoint))
                .map_err(|e| format!("{name}: SKIP: mount: {e}"))
            });
        if let Err(e) = made {
            let _ = std::fs::remove_dir(&mountpoint);
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        Ok(Fs {
            label: format!("{name} (loop)"),
            dir: mountpoint.clone(),
            mount: Some((mountpoint, image)),
        })
    }

    /// Gives the freed blocks of a loop filesystem back to the image file between measurements, so that the
    /// image file stays as small as what is stored (best effort: fstrim is not part of what is measured).
    pub fn trim(&self) {
        if self.mount.is_some() {
            let _ = run(Command::new("fstrim").arg(&self.dir));
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some((mountpoint, image)) = self.mount.take() {
            if let Err(e) = run(Command::new("umount").arg(&mountpoint)) {
                eprintln!("cannot unmount {}: {e}", mountpoint.display());
                return;
            }
            let _ = std::fs::remove_dir(&mountpoint);
            let _ = std::fs::remove_file(&image);
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn command_exists(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The filesystem type of `dir`, and for ext4 whether it has a journal (this machine's root ext4 has none).
fn fstype(dir: &Path) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE", "-T"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut parts = out.split_whitespace();
    let (Some(fstype), source) = (parts.next(), parts.next()) else {
        return "unknown filesystem".into();
    };
    if fstype != "ext4" {
        return fstype.to_string();
    }
    // dumpe2fs may not open the device (this VM refuses it); the kernel says whether a journal runs.
    let dev = source
        .and_then(|s| Path::new(s).file_name())
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")) {
        Ok(task) if task.trim() == "<none>" => "ext4 without a journal".into(),
        Ok(_) => "ext4 (journaled)".into(),
        Err(_) => "ext4".into(),
    }
}
