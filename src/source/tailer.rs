//! Following one log path across rotations.
//!
//! Each poll first checks what the path names now, then reads to the end:
//! - rename + create: the old file is read to its end, then kept open as a draining
//!   generation (a writer that has not reopened yet may still append to it) while the new
//!   file is read from its start;
//! - copytruncate: the same inode got shorter, or its first bytes changed: read from 0;
//! - delete + recreate: like rename (the deleted file is drained through its open fd);
//! - the path not existing yet: wait, then read the new file from its start.
//!
//! Partial lines wait for their newline; over-long lines are dropped (see `lines`).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::checkpoint::{Checkpoint, FileId, FilePos, Fingerprint, FINGERPRINT_BYTES};
use super::lines::{Chunk, ChunkReader};

/// One generation (inode) of the followed path.
struct Generation {
    file: File,
    id: FileId,
    fingerprint: Fingerprint,
    /// The bytes just before the offset: with the head fingerprint, tells a copy of this
    /// file (copytruncate) from another file that merely starts the same way.
    tail: Fingerprint,
    reader: ChunkReader,
    last_growth: Instant,
}

impl Generation {
    fn open(path: &Path, offset: u64, max_line: usize) -> io::Result<Generation> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        file.seek(SeekFrom::Start(offset))?;
        let fingerprint = Fingerprint::read(&file, FINGERPRINT_BYTES)?;
        Ok(Generation {
            id: FileId::of(&meta),
            tail: tail_before(&file, offset)?,
            file,
            fingerprint,
            reader: ChunkReader::new(max_line, offset),
            last_growth: Instant::now(),
        })
    }

    fn pos(&self) -> FilePos {
        FilePos {
            id: self.id,
            fingerprint: self.fingerprint,
            offset: self.reader.offset(),
        }
    }

    /// Restarts from the beginning (the file was truncated under us).
    fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.reader.reset(0);
        self.fingerprint = Fingerprint::read(&self.file, FINGERPRINT_BYTES)?;
        self.tail = Fingerprint::of_bytes(&[]);
        Ok(())
    }

    /// True when the file was truncated (or truncated and refilled) since we read it. In
    /// an append-only file neither its first bytes nor the bytes just before our offset ever
    /// change; the second check also catches a refill that starts like the old content
    /// (the same first line, to the second).
    fn truncated(&self, len: u64) -> io::Result<bool> {
        let read_to = self.reader.offset() + self.reader.pending() as u64;
        if len < read_to || !self.fingerprint.matches(&self.file)? {
            return Ok(true);
        }
        Ok(tail_before(&self.file, self.reader.offset()).map_or(true, |t| t != self.tail))
    }
}

/// Follows one path. `poll` hands complete lines to a sink with the checkpoint that holds
/// once those lines are dealt with.
pub struct FileFollower {
    path: PathBuf,
    max_line: usize,
    current: Option<Generation>,
    draining: Vec<Generation>,
    drain_grace: Duration,
    /// Over-long lines already reported.
    reported_long: u64,
}

/// Where to begin when there is no checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At this offset of the file the path names now (from `backscan`).
    At(u64),
    /// At the beginning (`dovegate test`, or a file created after start).
    Beginning,
}

impl FileFollower {
    /// Starts following `path` with no checkpoint.
    pub fn new(path: &Path, max_line: usize, start: Start) -> FileFollower {
        let mut f = FileFollower::empty(path, max_line);
        let offset = match start {
            Start::At(o) => o,
            Start::Beginning => 0,
        };
        match Generation::open(path, offset, max_line) {
            Ok(g) => f.current = Some(g),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "log file does not exist yet; waiting for it");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open log file yet")
            }
        }
        f
    }

    fn empty(path: &Path, max_line: usize) -> FileFollower {
        FileFollower {
            path: path.to_path_buf(),
            max_line,
            current: None,
            draining: Vec::new(),
            drain_grace: Duration::from_secs(30),
            reported_long: 0,
        }
    }

    /// Resumes from a checkpoint: every generation it names is looked for at the path and
    /// among its siblings (a rotated `mail.log.1` keeps its inode), and read on from its
    /// offset. A generation that cannot be found is reported and skipped.
    pub fn resume(path: &Path, max_line: usize, cp: &Checkpoint) -> FileFollower {
        let mut f = FileFollower::empty(path, max_line);
        for pos in &cp.files {
            match find_generation(path, pos) {
                Some((found, true)) => match Generation::open(&found, pos.offset, max_line) {
                    Ok(g) => f.current = Some(g),
                    Err(e) => tracing::warn!(path = %found.display(), error = %e, "cannot reopen"),
                },
                Some((found, false)) => match Generation::open(&found, pos.offset, max_line) {
                    Ok(g) => {
                        tracing::info!(path = %found.display(), offset = pos.offset, "reading the rest of a rotated file");
                        f.draining.push(g)
                    }
                    Err(e) => tracing::warn!(path = %found.display(), error = %e, "cannot reopen"),
                },
                None => tracing::warn!(
                    path = %path.display(),
                    inode = pos.id.ino,
                    "a checkpointed file generation is gone (rotated away or truncated); lines after offset {} in it are not read",
                    pos.offset
                ),
            }
        }
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint as of what has been handed out.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            path: self.path.clone(),
            files: self
                .draining
                .iter()
                .chain(self.current.as_ref())
                .map(Generation::pos)
                .collect(),
        }
    }

    /// Over-long lines dropped so far.
    pub fn dropped_long_lines(&self) -> u64 {
        self.draining
            .iter()
            .chain(self.current.as_ref())
            .map(|g| g.reader.dropped_long_lines)
            .sum::<u64>()
            + self.reported_long
    }

    /// Reads everything available now. `sink(lines, checkpoint)` gets chunks of whole lines
    /// and the checkpoint that is valid once they are processed.
    pub fn poll(&mut self, sink: &mut dyn FnMut(&[u8], &Checkpoint)) -> io::Result<()> {
        // A drained generation whose content was replaced (a copy overwritten in place) is
        // no longer the file we were reading: forget it rather than read foreign lines.
        self.draining.retain(|g| {
            let replaced = g
                .file
                .metadata()
                .and_then(|m| g.truncated(m.len()))
                .unwrap_or(true);
            if replaced {
                tracing::warn!(
                    inode = g.id.ino,
                    "a rotated file being drained was overwritten; no longer reading it"
                );
            }
            !replaced
        });
        for i in 0..self.draining.len() {
            self.read_generation(Slot::Draining(i), sink)?;
        }
        let grace = self.drain_grace;
        self.draining.retain(|g| g.last_growth.elapsed() < grace);
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.current.is_some() {
                    self.read_generation(Slot::Current, sink)?;
                }
            }
            Err(e) => return Err(e),
            Ok(meta) => {
                let id = FileId::of(&meta);
                match &mut self.current {
                    Some(cur) if cur.id == id => {
                        if cur.truncated(meta.len())? {
                            // copytruncate: the lines not read yet are in the copy, if it is
                            // still beside the file uncompressed (`mail.log.1`).
                            let unread = FilePos {
                                id: cur.id,
                                fingerprint: cur.fingerprint,
                                offset: cur.reader.offset(),
                            };
                            let tail = cur.tail;
                            match find_sibling(&self.path, |m, f| {
                                FileId::of(m) != unread.id
                                    && m.len() >= unread.offset
                                    && unread.fingerprint.matches(f).unwrap_or(false)
                                    && tail_before(f, unread.offset).is_ok_and(|t| t == tail)
                            }) {
                                Some(copy) => {
                                    tracing::info!(path = %self.path.display(), copy = %copy.display(), "log file was truncated (copytruncate); reading the rest from its copy");
                                    let mut g =
                                        Generation::open(&copy, unread.offset, self.max_line)?;
                                    g.fingerprint = unread.fingerprint;
                                    self.draining.push(g);
                                    let last = self.draining.len() - 1;
                                    self.read_generation(Slot::Draining(last), sink)?;
                                }
                                None => {
                                    tracing::warn!(path = %self.path.display(), "log file was truncated (copytruncate) and no copy was found; lines written just before the truncation may be missed")
                                }
                            }
                            if let Some(cur) = self.current.as_mut() {
                                cur.rewind()?;
                            }
                        }
                        self.read_generation(Slot::Current, sink)?;
                    }
                    _ => {
                        if let Some(mut old) = self.current.take() {
                            tracing::info!(path = %self.path.display(), "log file was rotated; draining the old one");
                            self.current = Some(Generation::open(&self.path, 0, self.max_line)?);
                            // Read the old one to its end first, then keep draining it.
                            old.last_growth = Instant::now();
                            self.draining.push(old);
                            let last = self.draining.len() - 1;
                            self.read_generation(Slot::Draining(last), sink)?;
                        } else {
                            self.current = Some(Generation::open(&self.path, 0, self.max_line)?);
                        }
                        self.read_generation(Slot::Current, sink)?;
                    }
                }
            }
        }
        let dropped = self.dropped_long_lines() - self.reported_long;
        if dropped > 0 {
            tracing::warn!(path = %self.path.display(), count = dropped, "skipped lines longer than the buffer");
            self.reported_long += dropped;
        }
        Ok(())
    }

    fn read_generation(
        &mut self,
        slot: Slot,
        sink: &mut dyn FnMut(&[u8], &Checkpoint),
    ) -> io::Result<()> {
        let mut cp = self.checkpoint();
        let index = match slot {
            Slot::Draining(i) => i,
            Slot::Current => self.draining.len(),
        };
        let g = match slot {
            Slot::Draining(i) => &mut self.draining[i],
            Slot::Current => match self.current.as_mut() {
                Some(g) => g,
                None => return Ok(()),
            },
        };
        loop {
            match g.reader.read_chunk(&mut g.file)? {
                Chunk::Eof => return Ok(()),
                Chunk::Partial => g.last_growth = Instant::now(),
                Chunk::Lines(lines, offset) => {
                    g.last_growth = Instant::now();
                    if g.fingerprint.len < FINGERPRINT_BYTES as u32 {
                        g.fingerprint = Fingerprint::read(&g.file, FINGERPRINT_BYTES)?;
                    }
                    g.tail = if lines.len() >= FINGERPRINT_BYTES {
                        Fingerprint::of_bytes(&lines[lines.len() - FINGERPRINT_BYTES..])
                    } else {
                        tail_before(&g.file, offset)?
                    };
                    cp.files[index] = FilePos {
                        id: g.id,
                        fingerprint: g.fingerprint,
                        offset,
                    };
                    sink(lines, &cp);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Draining(usize),
    Current,
}

/// Fingerprint of the (up to) 64 bytes before `offset`.
fn tail_before(file: &File, offset: u64) -> io::Result<Fingerprint> {
    use std::os::unix::fs::FileExt;
    let start = offset.saturating_sub(FINGERPRINT_BYTES as u64);
    let mut buf = [0u8; FINGERPRINT_BYTES];
    let want = (offset - start) as usize;
    file.read_exact_at(&mut buf[..want], start)?;
    Ok(Fingerprint::of_bytes(&buf[..want]))
}

/// Whether the regular file at `p` satisfies `test(metadata, file)`.
fn file_matches(p: &Path, test: &impl Fn(&std::fs::Metadata, &File) -> bool) -> bool {
    let Ok(f) = File::open(p) else { return false };
    let Ok(meta) = f.metadata() else { return false };
    meta.is_file() && test(&meta, &f)
}

/// A file beside `path` (not `path` itself) that satisfies `test`.
fn find_sibling(path: &Path, test: impl Fn(&std::fs::Metadata, &File) -> bool) -> Option<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rd = std::fs::read_dir(dir).ok()?;
    // Look at a bounded number of siblings: log directories can be large.
    rd.filter_map(Result::ok)
        .take(10_000)
        .map(|e| e.path())
        .find(|p| p != path && file_matches(p, &test))
}

/// Finds the file holding a checkpointed generation: the path itself (`true`) or a sibling
/// (a rotated `mail.log.1` keeps its inode).
fn find_generation(path: &Path, pos: &FilePos) -> Option<(PathBuf, bool)> {
    let test = |m: &std::fs::Metadata, f: &File| {
        FileId::of(m) == pos.id
            && m.len() >= pos.offset
            && pos.fingerprint.matches(f).unwrap_or(false)
    };
    if file_matches(path, &test) {
        return Some((path.to_path_buf(), true));
    }
    find_sibling(path, test).map(|p| (p, false))
}
