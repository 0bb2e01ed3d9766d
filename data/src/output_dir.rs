//! The directory a preparation writes into, published by its manifest (written last).
//!
//! A preparation that fails — a bad line in the third input file, a full disk — must
//! neither leave a directory that looks valid nor one that blocks the corrected rerun, and
//! must never remove what it did not write. So the directory is claimed for the run
//! ([`OutputDir::claim`]) with a marker file naming the process; unless the run ends with
//! [`OutputDir::publish`], the files it created are removed again (and the directory, if
//! the run created it). The marker also keeps a second preparation out while one runs, and
//! tells a later one that what a killed run left is its own to clear.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::manifest::MANIFEST_FILE;
use crate::DataError;

/// The claim marker: `pid <pid> on <host>` of the preparation writing the directory.
const MARKER: &str = ".preparing";

/// The tokenizer file every preparation writes, and may also read (`--tokenizer` naming
/// the directory's own): never removed except when this run created it.
const TOKENIZER: &str = "tokenizer.json";

/// A claimed output directory; see the module docs.
pub(crate) struct OutputDir {
    dir: PathBuf,
    created: bool,
    ours: fn(&str) -> bool,
    /// Names of ours that were there when the run claimed the directory (kept on failure).
    there_before: BTreeSet<String>,
    published: bool,
}

impl OutputDir {
    /// Claims `dir` for a preparation whose files `ours` recognises by name. The directory
    /// may be absent or empty; or hold what a killed preparation left (its marker names a
    /// process that is gone), which is cleared; or, with `overwrite`, an earlier output,
    /// which is unpublished first (manifest removed) and its data files removed (its
    /// tokenizer is overwritten, never removed). Refused while another preparation writes
    /// there, and without `overwrite` when the directory holds anything else.
    pub(crate) fn claim(dir: &Path, overwrite: bool, ours: fn(&str) -> bool) -> Result<OutputDir, DataError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let marker = dir.join(MARKER);
        let leftovers = match std::fs::read_to_string(&marker) {
            // One on another machine cannot be checked from here: taken as running.
            Ok(holder) if crate::process::tag_alive(&holder) != Some(false) => {
                return Err(DataError::Input {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "another preparation is writing here ({}); wait for it or choose another --out (if that \
                         process is gone, remove {})",
                        holder.trim(),
                        marker.display()
                    ),
                })
            }
            Ok(_) => true,
            Err(_) => false,
        };
        let names = entry_names(dir)?;
        let others = names.iter().any(|n| n != MARKER && !(leftovers && ours(n)));
        if others && !overwrite {
            return Err(DataError::Input {
                path: dir.to_path_buf(),
                reason: "output directory is not empty; choose another --out or pass --overwrite".into(),
            });
        }
        // Unpublish first: with the manifest gone, a crash below leaves nothing that looks valid.
        let manifest = dir.join(MANIFEST_FILE);
        if manifest.exists() {
            std::fs::remove_file(&manifest).map_err(|e| DataError::io(&manifest, e))?;
        }
        for name in names.iter().filter(|n| ours(n) && (leftovers || n.as_str() != TOKENIZER)) {
            let path = dir.join(name);
            std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        }
        let there_before = entry_names(dir)?.into_iter().filter(|n| ours(n)).collect();
        if leftovers {
            let _ = std::fs::remove_file(&marker);
        }
        write_marker(&marker)?;
        Ok(OutputDir { dir: dir.to_path_buf(), created, ours, there_before, published: false })
    }

    /// The manifest is written: keep what the run wrote.
    pub(crate) fn publish(mut self) {
        self.published = true;
        let _ = std::fs::remove_file(self.dir.join(MARKER));
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        // Best effort: the run's own error is the one to report.
        for name in entry_names(&self.dir).unwrap_or_default() {
            if (self.ours)(&name) && !self.there_before.contains(&name) {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        let _ = std::fs::remove_file(self.dir.join(MARKER));
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Writes the marker, failing if another process created it first.
fn write_marker(marker: &Path) -> Result<(), DataError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(marker).map_err(|e| DataError::Input {
            path: marker.to_path_buf(),
            reason: format!("{e}; another preparation may have started here at the same time"),
        })?;
    writeln!(file, "{}", crate::process::tag()).map_err(|e| DataError::io(marker, e))
}

fn entry_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}
