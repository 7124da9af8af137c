//! Audit rows the store would not take before the server stopped. At a graceful stop the
//! writer puts what it still holds into files in the data directory (each written whole
//! under a temporary name, synced, then renamed, readable by the server's user only; at most
//! [`ROWS_PER_FILE`] rows each); the writer of a later start claims such files, writes their
//! rows before new ones and removes each file once its rows are in the store, then claims
//! the next. So a store outage that outlasts the server loses no row: a crash between a
//! write and a file's removal writes a row twice, never drops one.
//!
//! A claimed file stays locked (`flock`) until it is removed or its rows are kept again, so
//! two servers sharing a data directory never both write it. Nothing in a file is trusted:
//! only regular files are opened (no links, no pipes), within a size bound, and every line
//! must be a row the server could have written, or the whole file is left where it is.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::IceIssuance;

/// How the files are named: `audit-unwritten-<ms since the epoch>-<random>-<n>.jsonl`.
const PREFIX: &str = "audit-unwritten-";
const SUFFIX: &str = ".jsonl";
/// Rows per file, so that claiming one file at a time keeps what is held bounded.
pub(crate) const ROWS_PER_FILE: usize = 65_536;
/// A larger file is not one of the server's own ([`ROWS_PER_FILE`] rows of at most about
/// 200 bytes each), and is left alone.
const MAX_FILE: u64 = 64 << 20;
/// A temporary file older than this was left by a stop cut short (its rows are still in the
/// files it was to replace, or were never kept), and is removed.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// One row as a line of the file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    u: std::borrow::Cow<'a, str>,
    i: i64,
    t: i64,
    e: i64,
}

/// Writes `rows` to new files in `dir` (created if needed), [`ROWS_PER_FILE`] at most each,
/// all or none; their paths.
pub(crate) fn write(dir: &Path, rows: &[IceIssuance]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // One random part for the files of one write: they sort together, in order.
    let group = crate::ids::random_id(8);
    let mut written: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (n, chunk) in rows.chunks(ROWS_PER_FILE).enumerate() {
        let name = format!("{PREFIX}{millis:013}-{group}-{n:04}{SUFFIX}");
        let temporary = dir.join(format!(".{name}.tmp"));
        let outcome = write_temporary(&temporary, chunk);
        written.push((temporary, dir.join(name)));
        if let Err(e) = outcome {
            for (temporary, _) in &written {
                let _ = std::fs::remove_file(temporary);
            }
            return Err(e);
        }
    }
    let mut paths = Vec::with_capacity(written.len());
    for (n, (temporary, path)) in written.iter().enumerate() {
        if let Err(e) = std::fs::rename(temporary, path) {
            // All or none: the files already in place go, with the temporaries left.
            paths.iter().for_each(|path| {
                let _ = std::fs::remove_file(path);
            });
            written[n..].iter().for_each(|(temporary, _)| {
                let _ = std::fs::remove_file(temporary);
            });
            return Err(e);
        }
        paths.push(path.clone());
    }
    // The renames are durable once the directory is synced; the files are there either way.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the directory of kept audit rows");
    }
    Ok(paths)
}

/// Writes and syncs one temporary file, private to the server's user.
fn write_temporary(temporary: &Path, rows: &[IceIssuance]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = BufWriter::new(options.open(temporary)?);
    for row in rows {
        let line = Line {
            u: std::borrow::Cow::Borrowed(&row.user_id),
            i: row.issued_at,
            t: row.ttl,
            e: row.expires_at,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A file whose rows were taken back: locked by this process until [`Claimed::remove`] (or
/// until it is dropped).
pub(crate) struct Claimed {
    path: PathBuf,
    _lock: File,
}

impl Claimed {
    /// Removes the file: its rows are in the store, or in newer files.
    pub(crate) fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::error!(file = %self.path.display(), error = %e, "cannot remove a file of audit rows already written; its rows will be written again");
        }
    }
}

/// What a claim took.
#[derive(Default)]
pub(crate) struct Claim {
    pub rows: Vec<IceIssuance>,
    pub files: Vec<Claimed>,
    /// Files were left for a later claim (the rows taken reached the bound).
    pub more: bool,
}

/// Claims the files earlier runs left in `dir`, oldest first, whole files while they hold at
/// most `enough` rows together (the first is taken whatever its size). A file another server
/// has claimed is skipped; one that cannot be read whole, or holds a line that is not a row,
/// is left where it is, with an error in the log, and none of its rows is taken.
pub(crate) fn claim(dir: &Path, enough: usize) -> Claim {
    let mut claim = Claim::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return claim,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot look for audit rows earlier runs could not write");
            return claim;
        }
    };
    let mut names = Vec::new();
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
            names.push(entry.path());
        } else if name
            .strip_prefix('.')
            .is_some_and(|n| n.starts_with(PREFIX))
            && name.ends_with(".tmp")
        {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMPORARY);
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    names.sort();
    for path in names {
        match claim_file(&path) {
            Ok(Some((rows, lock))) => {
                let file = Claimed { path, _lock: lock };
                if rows.is_empty() {
                    file.remove();
                    continue;
                }
                if !claim.rows.is_empty() && claim.rows.len() + rows.len() > enough {
                    // Unlocked as it is dropped: a later claim takes it.
                    claim.more = true;
                    break;
                }
                tracing::info!(file = %file.path.display(), rows = rows.len(), "writing audit rows an earlier run could not");
                claim.rows.extend(rows);
                claim.files.push(file);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot take back audit rows an earlier run could not write; the file is left as it is");
            }
        }
    }
    claim
}

/// Locks and reads one file; `None` when another process holds it, or it went away.
fn claim_file(path: &Path) -> std::io::Result<Option<(Vec<IceIssuance>, File)>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Neither a link (it would name a file elsewhere) nor a pipe (it would block).
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NOFOLLOW | libc::O_NONBLOCK,
    );
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if metadata.len() > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "{} bytes is more than a file of audit rows may hold ({MAX_FILE})",
            metadata.len()
        )));
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // Locked, but perhaps only after its claimer removed it (or a new file took its name).
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(path) {
            Ok(now) if now.ino() == metadata.ino() && now.dev() == metadata.dev() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let mut rows = Vec::new();
    // Bounded whatever the file does meanwhile.
    let reader = BufReader::new((&file).take(MAX_FILE));
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if n == ROWS_PER_FILE {
            return Err(std::io::Error::other(format!(
                "more than {ROWS_PER_FILE} rows, more than the server writes to a file"
            )));
        }
        let row = parse_line(&line)
            .map_err(|why| std::io::Error::other(format!("line {}: {why}", n + 1)))?;
        rows.push(row);
    }
    Ok(Some((rows, file)))
}

/// A line as the row it must be: a valid user id, a lifetime that is not negative, and the
/// expiry the issue time and lifetime give (as every row the server writes has).
fn parse_line(line: &str) -> Result<IceIssuance, String> {
    let read: Line<'_> = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let user = crate::ids::UserId::parse(read.u.as_ref()).map_err(|e| e.to_string())?;
    if read.i < 0 || read.t < 0 || read.i.checked_add(read.t) != Some(read.e) {
        return Err("the times do not make an issue time, a lifetime and its expiry".into());
    }
    Ok(IceIssuance {
        user_id: user.as_str().to_string(),
        issued_at: read.i,
        ttl: read.t,
        expires_at: read.e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, tag: &str) -> Vec<IceIssuance> {
        (0..n)
            .map(|i| IceIssuance {
                user_id: format!("{tag}-{i}|x.y_z"),
                issued_at: i as i64,
                ttl: 60,
                expires_at: i as i64 + 60,
            })
            .collect()
    }

    fn temporary_dir() -> PathBuf {
        std::env::temp_dir().join(format!("hypha-rtc-spill-{}", crate::ids::random_id(8)))
    }

    /// Rows written come back whole and in order, oldest file first, more than a file's
    /// worth split over files; the files are private; a claimed file is not claimed again
    /// while held, and is gone once removed.
    #[test]
    fn written_rows_are_claimed_once_and_removed() {
        let dir = temporary_dir();
        let first = write(&dir, &rows(ROWS_PER_FILE + 3, "first")).unwrap();
        assert_eq!(first.len(), 2);
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(&dir, &rows(2, "second")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&first[0]).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let claim = claim(&dir, usize::MAX);
        let mut expected = rows(ROWS_PER_FILE + 3, "first");
        expected.extend(rows(2, "second"));
        assert!(claim.rows == expected && !claim.more);
        assert_eq!(claim.files.len(), 3);
        let again = super::claim(&dir, usize::MAX);
        assert!(
            again.rows.is_empty() && again.files.is_empty(),
            "held files are skipped"
        );
        claim.files.into_iter().for_each(Claimed::remove);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "no file and no temporary file is left");
        std::fs::remove_dir_all(dir).ok();
    }

    /// Claiming takes whole files up to the bound (the first whatever its size) and says
    /// more are left; files that are not rows, links, pipes and files too large or too long are left in
    /// place, none of their lines taken; stale temporary files go; no directory, no rows.
    #[test]
    fn claims_are_bounded_and_strange_files_left_alone() {
        let dir = temporary_dir();
        assert!(claim(&dir, usize::MAX).rows.is_empty());
        write(&dir, &rows(3, "a")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(&dir, &rows(3, "b")).unwrap();
        let first = claim(&dir, 2);
        assert!(first.rows == rows(3, "a") && first.more);
        let second = claim(&dir, usize::MAX);
        assert!(
            second.rows == rows(3, "b") && !second.more,
            "the first file is held"
        );
        drop((first, second));
        let bad_lines = [
            "not json",
            "{\"u\":\"a\\u0000\",\"i\":1,\"t\":1,\"e\":2}",
            "{\"u\":\"\",\"i\":1,\"t\":1,\"e\":2}",
            "{\"u\":\"x y\",\"i\":1,\"t\":1,\"e\":2}",
            "{\"u\":\"x\",\"i\":1,\"t\":1,\"e\":3}",
            "{\"u\":\"x\",\"i\":1,\"t\":-1,\"e\":0}",
            "{\"u\":\"x\",\"i\":9223372036854775807,\"t\":1,\"e\":0}",
        ];
        let mut strange = Vec::new();
        for (n, bad) in bad_lines.iter().enumerate() {
            let path = dir.join(format!("{PREFIX}000000000000{n}-bad{SUFFIX}"));
            std::fs::write(
                &path,
                format!("{{\"u\":\"x\",\"i\":1,\"t\":1,\"e\":2}}\n{bad}\n"),
            )
            .unwrap();
            strange.push(path);
        }
        #[cfg(unix)]
        {
            let elsewhere = dir.join("elsewhere.jsonl");
            std::fs::write(&elsewhere, "{\"u\":\"x\",\"i\":1,\"t\":1,\"e\":2}\n").unwrap();
            let link = dir.join(format!("{PREFIX}0000000000010-link{SUFFIX}"));
            std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
            let pipe = dir.join(format!("{PREFIX}0000000000011-pipe{SUFFIX}"));
            let made = std::process::Command::new("mkfifo").arg(&pipe).status();
            assert!(made.unwrap().success());
            strange.extend([link, pipe]);
        }
        let long = dir.join(format!("{PREFIX}0000000000013-long{SUFFIX}"));
        std::fs::write(
            &long,
            "{\"u\":\"x\",\"i\":1,\"t\":1,\"e\":2}\n".repeat(ROWS_PER_FILE + 1),
        )
        .unwrap();
        strange.push(long);
        let big = dir.join(format!("{PREFIX}0000000000012-big{SUFFIX}"));
        File::create(&big).unwrap().set_len(MAX_FILE + 1).unwrap();
        strange.push(big);
        // A temporary file of a stop long gone is removed; a recent one (perhaps another
        // server's, being written) is not.
        let stale = dir.join(format!(".{PREFIX}0000000000000-0000-old{SUFFIX}.tmp"));
        let recent = dir.join(format!(".{PREFIX}0000000000000-0000-new{SUFFIX}.tmp"));
        File::create(&stale)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * STALE_TEMPORARY)
            .unwrap();
        File::create(&recent).unwrap();
        let taken = claim(&dir, usize::MAX);
        let mut expected = rows(3, "a");
        expected.extend(rows(3, "b"));
        assert!(taken.rows == expected, "only the good files' rows");
        assert_eq!(taken.files.len(), 2);
        assert!(strange.iter().all(|path| path.symlink_metadata().is_ok()));
        assert!(!stale.exists() && recent.exists());
        std::fs::remove_dir_all(dir).ok();
    }
}
