//! Committing checkpoints: the owner of a run directory collects every rank's report of
//! the files it wrote, then writes the manifest last and publishes atomically.
//!
//! Reports arrive over the network, so everything in them is checked before it touches
//! the filesystem: file names are plain names inside the staging directory, sizes match
//! the files, ranks and world sizes agree, and a generation that was replaced can no
//! longer publish.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use moxin_proto::v1::CheckpointPart;
use prost::Message;

use super::{
    checkpoints_dir, is_plain_file_name, list, staging_dir, staging_dirs, step_dir_name, sweep, Checkpoint,
    CheckpointError, CheckpointManifest, PartitionFile, FORMAT, MANIFEST,
};

/// Largest group a report may claim (far beyond any real job; bounds what a bad report
/// can make the committer hold).
const MAX_WORLD: u32 = 1 << 16;

/// Checkpoints being committed in one run directory.
#[derive(Debug)]
pub struct Commits {
    run_dir: PathBuf,
    /// Reports so far, by (generation, step).
    pending: BTreeMap<(u64, u64), Vec<CheckpointPart>>,
    /// Reports of generations before this one are refused.
    oldest_generation: u64,
}

impl Commits {
    /// The committer of `run_dir`'s checkpoints (its owner holds the run directory's lock).
    /// Staging directories are left alone: a restarted coordinator may still complete
    /// its generation's checkpoint; [`Commits::abandon_before`] removes the others.
    pub fn new(run_dir: &Path) -> Self {
        Commits { run_dir: run_dir.to_path_buf(), pending: BTreeMap::new(), oldest_generation: 0 }
    }

    /// Adds one rank's report. When it completes the checkpoint (every rank of its
    /// generation has reported), writes the manifest, publishes the checkpoint, prunes old
    /// ones and returns the published directory.
    pub fn add(&mut self, part: CheckpointPart) -> Result<Option<PathBuf>, CheckpointError> {
        let staging = staging_dir(&self.run_dir, part.step, part.generation);
        let refuse = |reason: String| Err(CheckpointError::Invalid { path: staging.clone(), reason });
        if part.generation < self.oldest_generation {
            return Err(CheckpointError::Superseded {
                path: staging,
                generation: part.generation,
                by: self.oldest_generation,
            });
        }
        if let Err(reason) = check_report(&part) {
            return refuse(format!("rank {}'s report: {reason}", part.rank));
        }
        if !staging.is_dir() {
            // Published already (from the recorded reports, by a committer started after the
            // one these reports were meant for): nothing left to do.
            if Checkpoint::open(&checkpoints_dir(&self.run_dir).join(step_dir_name(part.step)))
                .is_ok_and(|c| c.manifest.world_size == part.world_size)
            {
                return Ok(None);
            }
            return refuse(format!("rank {} reported files, but the staging directory does not exist", part.rank));
        }
        let key = (part.generation, part.step);
        let parts = self.pending.entry(key).or_default();
        if let Some(other) = parts.iter().find(|p| p.rank == part.rank || p.world_size != part.world_size) {
            let reason = if other.rank == part.rank {
                format!("rank {} reported twice", part.rank)
            } else {
                format!(
                    "rank {} says the group has {} ranks, rank {} said {}",
                    part.rank, part.world_size, other.rank, other.world_size
                )
            };
            return refuse(reason);
        }
        parts.push(part);
        if parts.len() < parts[0].world_size as usize {
            return Ok(None);
        }
        let parts = self.pending.remove(&key).unwrap_or_default();
        let keep_last = rank0_keep_last(&parts);
        let dir = publish(&self.run_dir, &staging, parts)?;
        self.prune(key.1, keep_last)?;
        metrics::gauge!("moxin_last_checkpoint_step").set(key.1 as f64);
        metrics::gauge!("moxin_last_checkpoint_timestamp_seconds")
            .set(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        Ok(Some(dir))
    }

    /// Publishes every staging directory whose ranks all recorded their part (see
    /// [`record_part`]) and that is newer than the newest published checkpoint: a group
    /// that finished writing a checkpoint whose committer died (the coordinator was killed
    /// for good, or `train` crashed between writing and publishing) loses nothing. Returns
    /// the directories published; what cannot be recovered is left for
    /// [`Commits::abandon_before`].
    pub fn recover(&mut self) -> Vec<PathBuf> {
        let mut published = Vec::new();
        for dir in staging_dirs(&self.run_dir) {
            let newest = list(&self.run_dir).ok().and_then(|l| l.first().map(|(step, _)| *step));
            let Some(parts) = recorded_parts(&dir) else { continue };
            if newest.is_some_and(|n| n >= parts[0].step) {
                continue;
            }
            let (step, keep_last) = (parts[0].step, rank0_keep_last(&parts));
            match publish(&self.run_dir, &dir, parts).and_then(|dest| self.prune(step, keep_last).map(|_| dest)) {
                Ok(dest) => {
                    tracing::info!(dir = %dest.display(), "recovered a checkpoint whose commit was interrupted");
                    published.push(dest);
                }
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot recover an interrupted checkpoint: {e}"),
            }
        }
        published
    }

    /// After publishing step `newest`: keeps the newest `keep_last − 1` older checkpoints
    /// that look whole ([`Checkpoint::looks_whole`]: manifest, files, sizes; no hashing on
    /// the commit path) and removes every older one beyond them. A broken checkpoint (which
    /// resume skips) does not count, or it would push out the fallback a resume needs; it
    /// is left until enough whole ones are newer than it.
    fn prune(&mut self, newest: u64, keep_last: u32) -> Result<(), CheckpointError> {
        let wanted = keep_last.max(1) as usize - 1;
        let mut kept = 0;
        // Only checkpoints older than this one: a newer, broken one (skipped at resume) must
        // not push the one just published out.
        for (step, dir) in list(&self.run_dir)?.into_iter().filter(|(step, _)| *step < newest) {
            if kept < wanted {
                match Checkpoint::looks_whole(&dir) {
                    Ok(()) => kept += 1,
                    Err(e) => tracing::warn!("a broken checkpoint does not count toward keep_last: {e}"),
                }
                continue;
            }
            tracing::debug!(dir = %dir.display(), step, "pruning old checkpoint");
            std::fs::remove_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        }
        Ok(())
    }

    /// Generation `generation` formed: checkpoints of older generations can no longer
    /// complete, so their reports are dropped and their staging directories removed.
    pub fn abandon_before(&mut self, generation: u64) {
        self.oldest_generation = self.oldest_generation.max(generation);
        self.pending.retain(|(g, _), _| *g >= generation);
        sweep(&self.run_dir, |name| {
            name.rsplit_once("-g").and_then(|(_, g)| g.parse::<u64>().ok()).is_none_or(|g| g < generation)
        });
    }
}

/// Rank 0's `keep_last` (the job's; every rank sends it).
fn rank0_keep_last(parts: &[CheckpointPart]) -> u32 {
    parts.iter().find(|p| p.rank == 0).unwrap_or(&parts[0]).keep_last
}

/// Name of the file in which a rank records its report inside the staging directory
/// (hidden: never part of the checkpoint's file list).
fn part_record(rank: u32) -> String {
    format!(".part-{rank:05}.pb")
}

/// Records a rank's report next to its files (fsynced), before it is sent to the
/// committer, so a committer that starts later can still publish the checkpoint
/// ([`Commits::recover`]).
pub fn record_part(staging: &Path, part: &CheckpointPart) -> Result<(), CheckpointError> {
    write_synced(&staging.join(part_record(part.rank)), &part.encode_to_vec())
}

/// Every rank's recorded report in `dir`, if all ranks of one group recorded one and each
/// passes the checks a report over the network would.
fn recorded_parts(dir: &Path) -> Option<Vec<CheckpointPart>> {
    let mut parts: Vec<CheckpointPart> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(".part-") && n.ends_with(".pb")))
        .filter_map(|e| CheckpointPart::decode(std::fs::read(e.path()).ok()?.as_slice()).ok())
        .filter(|p| check_report(p).is_ok())
        .collect();
    parts.sort_by_key(|p| p.rank);
    let world = parts.first()?.world_size;
    let whole = parts.len() == world as usize
        && parts.iter().enumerate().all(|(i, p)| {
            p.rank == i as u32
                && p.world_size == world
                && (p.step, p.generation) == (parts[0].step, parts[0].generation)
        });
    (whole && dir == staging_dir(dir.parent()?.parent()?, parts[0].step, parts[0].generation)).then_some(parts)
}

/// The most optimizer files one report may name (a rank writes at most
/// [`super::PARTITION_FILES_MAX`]; the margin leaves room for that to grow).
const MAX_OPTIMIZER_FILES: usize = 64;

/// Checks what can be checked of one report on its own.
fn check_report(part: &CheckpointPart) -> Result<(), String> {
    if part.world_size == 0 || part.world_size > MAX_WORLD || part.rank >= part.world_size {
        return Err(format!("rank {} of a group of {} is impossible", part.rank, part.world_size));
    }
    for f in &part.files {
        if !is_plain_file_name(&f.name) {
            return Err(format!("file name {:?} is not a plain file name of a checkpoint", f.name));
        }
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("file {}: {:?} is not a sha256 digest", f.name, f.sha256));
        }
        if f.file_bytes > 0 && f.offset.checked_add(f.bytes).is_none_or(|end| end > f.file_bytes) {
            return Err(format!(
                "file {}: bytes {}+{} lie outside its {} bytes",
                f.name, f.offset, f.bytes, f.file_bytes
            ));
        }
    }
    if part.optimizer_files.is_empty() {
        return Err("it names no optimizer partition file (a report from an older moxin-train build?)".into());
    }
    if part.optimizer_files.len() > MAX_OPTIMIZER_FILES {
        return Err(format!(
            "it names {} optimizer partition files, more than {MAX_OPTIMIZER_FILES}",
            part.optimizer_files.len()
        ));
    }
    let written: std::collections::HashSet<&str> = part.files.iter().map(|f| f.name.as_str()).collect();
    let mut previous_end = None;
    for o in &part.optimizer_files {
        if !written.contains(o.file.as_str()) {
            return Err(format!("its optimizer partition file {:?} is not among its files", o.file));
        }
        if o.start < 0 || o.end < o.start || previous_end.is_some_and(|end| o.start != end) {
            return Err(format!(
                "optimizer file {:?}: range [{}, {}) is impossible or does not continue its partition",
                o.file, o.start, o.end
            ));
        }
        previous_end = Some(o.end);
    }
    if part.rank == 0 {
        let manifest: CheckpointManifest =
            serde_json::from_str(&part.manifest_json).map_err(|e| format!("invalid manifest fields: {e}"))?;
        if manifest.step != part.step || manifest.world_size != part.world_size {
            return Err(format!(
                "the manifest says step {} of {} ranks, the report step {} of {}",
                manifest.step, manifest.world_size, part.step, part.world_size
            ));
        }
        if part.keep_last == 0 {
            return Err("keep_last is 0".into());
        }
    }
    Ok(())
}

/// Writes the manifest of a complete set of reports into `staging` (last), renames it into
/// place (the committer prunes after it).
fn publish(run_dir: &Path, staging: &Path, mut parts: Vec<CheckpointPart>) -> Result<PathBuf, CheckpointError> {
    parts.sort_by_key(|p| p.rank);
    let invalid = |reason: String| CheckpointError::Invalid { path: staging.to_path_buf(), reason };
    let rank0 = &parts[0];
    let mut manifest: CheckpointManifest =
        serde_json::from_str(&rank0.manifest_json).map_err(|e| invalid(format!("invalid manifest fields: {e}")))?;
    manifest.format = FORMAT.into();
    manifest.files.clear();
    manifest.file_parts.clear();
    manifest.file_bytes.clear();
    manifest.optimizer.clear();
    for part in &parts {
        for f in &part.files {
            let path = staging.join(&f.name);
            let size = std::fs::metadata(&path).map_err(|e| CheckpointError::io(&path, e))?.len();
            let whole = f.file_bytes == 0;
            let expected = if whole { f.bytes } else { f.file_bytes };
            if size != expected {
                return Err(invalid(format!(
                    "rank {} reported {expected} bytes for {}, the file has {size}",
                    part.rank, f.name
                )));
            }
            manifest.file_bytes.insert(f.name.clone(), size);
            if !manifest.record_written(f) {
                return Err(invalid(format!("{} was reported whole by one rank and again by another", f.name)));
            }
        }
        manifest.optimizer.extend(part.optimizer_files.iter().map(PartitionFile::from));
    }
    // The ranks' optimizer files tile the flat buffer from its start, in rank order, each
    // file once: a loader trusts the ranges to restore every element exactly once.
    let mut next = 0;
    let mut names = std::collections::HashSet::new();
    for o in &manifest.optimizer {
        if o.start != next {
            return Err(invalid(format!(
                "the ranks' optimizer files leave elements {next}..{} unsaved or overlap ({} starts at {})",
                o.start.max(next),
                o.file,
                o.start
            )));
        }
        if !names.insert(o.file.as_str()) {
            return Err(invalid(format!("optimizer file {} is named by two ranks", o.file)));
        }
        next = o.end;
    }
    for (name, file_parts) in &mut manifest.file_parts {
        file_parts.sort_by_key(|p| p.offset);
        let mut next = 0;
        for p in file_parts.iter() {
            if p.offset != next {
                return Err(invalid(format!(
                    "the ranks' parts of {name} leave bytes {next}..{} unreported or overlap",
                    p.offset
                )));
            }
            next = p.offset + p.bytes;
        }
        let size = file_parts.first().map_or(0, |_| std::fs::metadata(staging.join(name)).map_or(0, |m| m.len()));
        if next != size {
            return Err(invalid(format!("the ranks' parts of {name} cover {next} of its {size} bytes")));
        }
    }
    for part in &parts {
        let _ = std::fs::remove_file(staging.join(part_record(part.rank)));
    }
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| invalid(e.to_string()))?;
    write_synced(&staging.join(MANIFEST), json.as_bytes())?;
    sync_dir(staging)?;

    let root = checkpoints_dir(run_dir);
    let dest = root.join(step_dir_name(manifest.step));
    if dest.exists() {
        // The same step saved before (a resumed run passing it again): replace it.
        let old = root.join(format!(".tmp-old-{}-{}", step_dir_name(manifest.step), std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| CheckpointError::io(&dest, e))?;
        std::fs::rename(staging, &dest).map_err(|e| CheckpointError::io(&dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staging, &dest).map_err(|e| CheckpointError::io(&dest, e))?;
    }
    sync_dir(&root)?;
    Ok(dest)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| CheckpointError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| CheckpointError::io(dir, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::{partition_file, write::write_segments, BuildInfo, Checkpoint, RngState};
    use moxin_proto::v1::OptimizerFile;

    fn manifest(step: u64, world: u32) -> String {
        let m = CheckpointManifest {
            format: String::new(),
            step,
            data_cursor: step * 4,
            tokens: 0,
            elapsed_s: 0.0,
            rng: RngState { seed: 1, data_order: "x".into() },
            world_size: world,
            seq_len: 8,
            model: crate::shape::tests::moxin_7b(),
            data_manifest_sha256: String::new(),
            resolved_config_toml: String::new(),
            optimizer: Vec::new(),
            files: Default::default(),
            file_parts: Default::default(),
            file_bytes: Default::default(),
            build: BuildInfo::default(),
            token_ids: None,
        };
        serde_json::to_string(&m).unwrap()
    }

    /// Rank `rank` writes its partition (and rank 0 the model) and makes its report.
    pub(crate) fn part(run: &Path, generation: u64, step: u64, rank: u32, world: u32) -> CheckpointPart {
        let staging = staging_dir(run, step, generation);
        std::fs::create_dir_all(&staging).unwrap();
        let name = partition_file(rank as usize);
        let mut files = write_segments(&staging.join(&name), &[&[rank as u8; 10]]).unwrap();
        let start = rank as i64 * 10;
        if rank == 0 {
            files.extend(write_segments(&staging.join("model.safetensors"), &[b"model"]).unwrap());
        }
        CheckpointPart {
            worker_id: String::new(),
            generation,
            step,
            rank,
            world_size: world,
            files,
            optimizer_files: vec![OptimizerFile { file: name, start, end: start + 10 }],
            manifest_json: if rank == 0 { manifest(step, world) } else { String::new() },
            keep_last: 2,
        }
    }

    #[test]
    fn publishes_once_every_rank_reported_and_prunes() {
        let run = tempfile::tempdir().unwrap();
        let mut commits = Commits::new(run.path());
        for step in [2, 4, 6] {
            assert_eq!(commits.add(part(run.path(), 1, step, 1, 2)).unwrap(), None);
            let dir = commits.add(part(run.path(), 1, step, 0, 2)).unwrap().unwrap();
            assert!(dir.ends_with(format!("step-{step:08}")));
        }
        let ckpt = Checkpoint::open(&run.path().join("checkpoints/step-00000006")).unwrap();
        assert_eq!(ckpt.manifest.format, FORMAT);
        assert_eq!(ckpt.manifest.files.len(), 3);
        assert_eq!(ckpt.manifest.optimizer[1], PartitionFile { file: partition_file(1), start: 10, end: 20 });
        let kept: Vec<u64> = list(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, [6, 4]);
    }

    #[test]
    fn a_partition_split_into_files_is_published_file_by_file_and_gaps_are_refused() {
        let run = tempfile::tempdir().unwrap();
        let mut p = part(run.path(), 1, 2, 0, 1);
        let staging = staging_dir(run.path(), 2, 1);
        p.files.retain(|f| !f.name.starts_with("optimizer."));
        p.optimizer_files.clear();
        for (k, (start, end)) in [(0, 4), (4, 7), (7, 10)].into_iter().enumerate() {
            let file = format!("optimizer.part-00000-{k}.safetensors");
            p.files.extend(write_segments(&staging.join(&file), &[&[k as u8; 3]]).unwrap());
            p.optimizer_files.push(OptimizerFile { file, start, end });
        }
        let mut gap = p.clone();
        gap.optimizer_files[1].start = 5;
        let e = Commits::new(run.path()).add(gap).unwrap_err().to_string();
        assert!(e.contains("does not continue its partition"), "{e}");
        let mut missing = p.clone();
        missing.files.pop();
        let e = Commits::new(run.path()).add(missing).unwrap_err().to_string();
        assert!(e.contains("optimizer.part-00000-2.safetensors") && e.contains("not among its files"), "{e}");
        let dir = Commits::new(run.path()).add(p).unwrap().expect("published");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let ranges: Vec<(i64, i64)> = ckpt.manifest.optimizer.iter().map(|o| (o.start, o.end)).collect();
        assert_eq!(ranges, [(0, 4), (4, 7), (7, 10)]);
        assert_eq!(ckpt.manifest.optimizer[2].file, "optimizer.part-00000-2.safetensors");
    }

    #[test]
    fn ranks_whose_optimizer_files_do_not_tile_the_flat_buffer_are_not_published() {
        let run = tempfile::tempdir().unwrap();
        let mut commits = Commits::new(run.path());
        let mut gap = part(run.path(), 1, 2, 1, 2);
        gap.optimizer_files[0].start = 12;
        gap.optimizer_files[0].end = 22;
        assert!(commits.add(gap).unwrap().is_none(), "each report is fine on its own");
        let e = commits.add(part(run.path(), 1, 2, 0, 2)).unwrap_err().to_string();
        assert!(e.contains("leave elements 10..12 unsaved or overlap"), "{e}");
        let mut late = part(run.path(), 1, 4, 0, 1);
        late.optimizer_files[0].start = 3;
        late.optimizer_files[0].end = 13;
        let e = commits.add(late).unwrap_err().to_string();
        assert!(e.contains("elements 0..3"), "{e}");
        assert!(list(run.path()).unwrap().is_empty());
    }

    #[test]
    fn a_file_hashed_in_ranges_is_published_and_verified_range_by_range() {
        let run = tempfile::tempdir().unwrap();
        let mut p = part(run.path(), 1, 2, 0, 1);
        let staging = staging_dir(run.path(), 2, 1);
        let name = p.optimizer_files[0].file.clone();
        p.files.retain(|f| f.name != name);
        let ranges =
            crate::checkpoint::write::write_segments_in_ranges(&staging.join(&name), &[b"0123456789"], 4).unwrap();
        assert_eq!(ranges.len(), 3);
        p.files.extend(ranges);
        let dir = Commits::new(run.path()).add(p).unwrap().expect("published");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let parts = &ckpt.manifest.file_parts[&partition_file(0)];
        assert_eq!(parts.iter().map(|p| (p.offset, p.bytes)).collect::<Vec<_>>(), [(0, 4), (4, 4), (8, 2)]);
        assert!(!ckpt.manifest.files.contains_key(&partition_file(0)));
        let path = dir.join(partition_file(0));
        std::fs::write(&path, b"0123X56789").unwrap();
        let e = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(e.contains("of bytes 4..8") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn bad_reports_are_refused_without_touching_anything() {
        let run = tempfile::tempdir().unwrap();
        let mut commits = Commits::new(run.path());
        let mut p = part(run.path(), 1, 2, 0, 1);
        p.files[0].name = "../../etc/passwd".into();
        assert!(commits.add(p).unwrap_err().to_string().contains("not a plain file name"));
        let mut p = part(run.path(), 1, 2, 0, 1);
        p.files[0].bytes += 1;
        assert!(commits.add(p).unwrap_err().to_string().contains("reported 11 bytes"));
        let mut p = part(run.path(), 1, 2, 3, 2);
        p.rank = 3;
        assert!(commits.add(p).unwrap_err().to_string().contains("impossible"));
        let mut p = part(run.path(), 1, 2, 0, 1);
        p.manifest_json = "{".into();
        assert!(commits.add(p).unwrap_err().to_string().contains("invalid manifest"));
        assert!(commits.add(part(run.path(), 1, 4, 1, 2)).unwrap().is_none());
        let e = commits.add(part(run.path(), 1, 4, 1, 2)).unwrap_err().to_string();
        assert!(e.contains("reported twice"), "{e}");
        assert!(list(run.path()).unwrap().is_empty());
    }

    #[test]
    fn a_checkpoint_whose_committer_died_is_recovered() {
        let run = tempfile::tempdir().unwrap();
        for step in [2, 4] {
            for rank in 0..2 {
                let p = part(run.path(), 3, step, rank, 2);
                record_part(&staging_dir(run.path(), step, 3), &p).unwrap();
            }
        }
        // Step 6: only one rank got there.
        let p = part(run.path(), 3, 6, 1, 2);
        record_part(&staging_dir(run.path(), 6, 3), &p).unwrap();
        let mut commits = Commits::new(run.path());
        let published = commits.recover();
        assert_eq!(published.len(), 2);
        let ckpt = Checkpoint::open(&run.path().join("checkpoints/step-00000004")).unwrap();
        assert_eq!(ckpt.manifest.optimizer.len(), 2);
        assert!(std::fs::read_dir(&ckpt.dir)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.')));
        assert!(staging_dir(run.path(), 6, 3).exists(), "an incomplete one waits for its ranks");
        // The ranks report the recovered checkpoint again (after reconnecting): accepted quietly.
        let mut again = part(run.path(), 3, 4, 1, 2);
        std::fs::remove_dir_all(staging_dir(run.path(), 4, 3)).unwrap();
        again.files.clear();
        again.files.push(moxin_proto::v1::WrittenFile {
            name: partition_file(1),
            sha256: "0".repeat(64),
            bytes: 10,
            ..Default::default()
        });
        assert_eq!(commits.add(again).unwrap(), None);
        commits.abandon_before(4);
        assert!(!staging_dir(run.path(), 6, 3).exists());
    }

    #[test]
    fn a_replaced_generation_cannot_publish() {
        let run = tempfile::tempdir().unwrap();
        let mut commits = Commits::new(run.path());
        assert!(commits.add(part(run.path(), 1, 2, 1, 2)).unwrap().is_none());
        commits.abandon_before(2);
        assert!(!staging_dir(run.path(), 2, 1).exists());
        let e = commits.add(part(run.path(), 1, 2, 0, 2)).unwrap_err().to_string();
        assert!(e.contains("was replaced by generation 2"), "{e}");
        // The new generation commits the same step in its own directory.
        assert!(commits.add(part(run.path(), 2, 2, 0, 1)).unwrap().is_some());
    }

    /// Three ranks write one model file at once, each its share; the published manifest
    /// has a digest per share, the file is the one a single writer makes, and damage to
    /// any share or a truncation is found.
    #[test]
    fn a_model_written_in_parts_by_every_rank_is_one_verified_file() {
        use crate::checkpoint::write::{
            split_safetensors, write_safetensors, write_safetensors_part, TensorBytes, TensorMeta,
        };
        let run = tempfile::tempdir().unwrap();
        let sizes = [700usize, 64, 1300, 8, 900, 450];
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("t{i}")).collect();
        let shapes: Vec<[i64; 1]> = sizes.iter().map(|&n| [n as i64]).collect();
        let data: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &n)| (0..n).map(|j| (i * 7 + j) as u8).collect()).collect();
        let metas: Vec<TensorMeta<'_>> =
            (0..sizes.len()).map(|i| TensorMeta { name: &names[i], dtype: "U8", shape: &shapes[i] }).collect();
        let split = split_safetensors(&metas, 3).unwrap();
        assert!(split.iter().all(|p| !p.is_empty()) && split[0].start == 0 && split[2].end == sizes.len());
        let reports = |skip_model_of: Option<u32>, generation: u64| -> Vec<CheckpointPart> {
            // The helper's own model file is replaced by the shares, written at once.
            let mut parts: Vec<CheckpointPart> = (0..3).map(|rank| part(run.path(), generation, 2, rank, 3)).collect();
            let staging = staging_dir(run.path(), 2, generation);
            std::fs::remove_file(staging.join("model.safetensors")).unwrap();
            std::thread::scope(|scope| {
                let handles: Vec<_> = parts
                    .iter_mut()
                    .enumerate()
                    .filter(|(rank, _)| skip_model_of != Some(*rank as u32))
                    .map(|(rank, p)| {
                        let (metas, split, data, staging) = (&metas, &split, &data, &staging);
                        scope.spawn(move || {
                            p.files.retain(|f| f.name != "model.safetensors");
                            let range = split[rank].clone();
                            let bytes: Vec<&[u8]> = data[range.clone()].iter().map(Vec::as_slice).collect();
                            let path = staging.join("model.safetensors");
                            let f = write_safetensors_part(&path, metas, range, &bytes, rank == 0).unwrap();
                            assert!(f.iter().all(|f| f.file_bytes > f.bytes), "a share, not the whole file");
                            p.files.extend(f);
                        })
                    })
                    .collect();
                handles.into_iter().for_each(|h| h.join().unwrap());
            });
            for p in &mut parts {
                p.files.retain(|f| f.name != "model.safetensors" || f.file_bytes > 0);
            }
            parts
        };

        // A share nobody reported is refused.
        let mut commits = Commits::new(run.path());
        let mut incomplete = reports(Some(1), 1);
        let last = incomplete.pop().unwrap();
        for p in incomplete {
            assert!(commits.add(p).unwrap().is_none());
        }
        let e = commits.add(last).unwrap_err().to_string();
        assert!(e.contains("unreported"), "{e}");

        let mut commits = Commits::new(run.path());
        let mut dir = None;
        for p in reports(None, 2) {
            dir = commits.add(p).unwrap();
        }
        let dir = dir.expect("published");
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(ckpt.manifest.file_parts["model.safetensors"].len(), 3);
        assert!(!ckpt.manifest.files.contains_key("model.safetensors"));
        let whole: Vec<TensorBytes<'_>> = (0..sizes.len())
            .map(|i| TensorBytes { name: &names[i], dtype: "U8", shape: &shapes[i], data: &data[i] })
            .collect();
        let single = run.path().join("single.safetensors");
        write_safetensors(&single, &whole).unwrap();
        let model = dir.join("model.safetensors");
        assert_eq!(std::fs::read(&model).unwrap(), std::fs::read(&single).unwrap());

        let mut bytes = std::fs::read(&model).unwrap();
        let middle = &ckpt.manifest.file_parts["model.safetensors"][1];
        bytes[(middle.offset + 3) as usize] ^= 1;
        std::fs::write(&model, &bytes).unwrap();
        let e = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("of bytes {}..", middle.offset)) && e.contains("corrupt"), "{e}");
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&model, &bytes).unwrap();
        let e = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
