//! The directory a preparation writes into, published by its manifest (written last).
//!
//! A preparation that fails — a bad line in the third input file, a full disk — must
//! neither leave a directory that looks valid nor one that blocks the corrected rerun. So
//! the directory is claimed for the run ([`OutputDir::claim`]) and, unless the run ends
//! with [`OutputDir::publish`], the files it wrote are removed again (and the directory,
//! if the run created it). Files the preparation does not write are never touched.

use std::path::{Path, PathBuf};

use crate::manifest::MANIFEST_FILE;
use crate::DataError;

/// A claimed output directory; see the module docs.
pub(crate) struct OutputDir {
    dir: PathBuf,
    created: bool,
    ours: fn(&str) -> bool,
    published: bool,
}

impl OutputDir {
    /// Claims `dir` for a preparation whose files `ours` recognises by name. The directory
    /// may be absent or empty; or hold an earlier unpublished output (ours only, no
    /// manifest: a run that was killed), which is cleared; or, with `overwrite`, an
    /// earlier output, which is unpublished first (manifest removed) and then cleared.
    pub(crate) fn claim(dir: &Path, overwrite: bool, ours: fn(&str) -> bool) -> Result<OutputDir, DataError> {
        let created = !dir.exists();
        if !created {
            let names = entry_names(dir)?;
            let unpublished_leftovers = !names.iter().any(|n| n == MANIFEST_FILE) && names.iter().all(|n| ours(n));
            if !names.is_empty() && !overwrite && !unpublished_leftovers {
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
            for name in names.iter().filter(|n| ours(n)) {
                let path = dir.join(name);
                std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        Ok(OutputDir { dir: dir.to_path_buf(), created, ours, published: false })
    }

    /// The manifest is written: keep what the run wrote.
    pub(crate) fn publish(mut self) {
        self.published = true;
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        // Best effort: the run's own error is the one to report.
        for name in entry_names(&self.dir).unwrap_or_default() {
            if (self.ours)(&name) || name == MANIFEST_FILE {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

fn entry_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}
