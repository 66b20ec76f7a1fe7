//! Following one log path across rotations.
//!
//! Each poll first reads on in the generations being drained, then checks what the path
//! names now, then reads to the end:
//! - rename + create: the old file is read to its end, then kept open as a draining
//!   generation (a writer that has not reopened yet may still append to it) while the new
//!   file is read from its start;
//! - copytruncate: the same inode got shorter, or its first bytes changed: the unread rest
//!   is read from the copy when it is beside the file, then the file from 0;
//! - delete + recreate: like rename (the deleted file is drained through its open fd);
//! - the path not existing yet: wait, then read the new file from its start;
//! - the path naming a directory, FIFO or device: never opened, reported by `poll`.
//!
//! Partial lines wait for their newline; over-long lines are dropped (see `lines`).
//!
//! Inherent limits (nobody can do better without reading the file in between): a
//! generation rotated away twice, deleted, or truncated and refilled before it was ever
//! read; a copytruncate whose copy is compressed or moved out of the directory at once; a
//! generation deleted, or copytruncated twice, while the daemon is down; after a crash, a
//! generation that no committed checkpoint named and that was rotated away meanwhile (so
//! each new generation is handed out with its checkpoint at once, see `poll`); a
//! checkpointed generation that held no byte yet is recognised by its inode alone, so a
//! later file that reuses the inode of a deleted one is taken for it (read from its start:
//! old lines again, never a lost one).

mod problem;

use std::fs::{File, Metadata};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use problem::open_if;
pub use problem::{open_regular, PathProblem};

use super::lines::{Chunk, ChunkReader};
use crate::state::{Checkpoint, FileId, FilePos, Fingerprint, FINGERPRINT_BYTES};

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
    /// Opens the regular file at `path` at `offset` (never blocks, never opens a FIFO).
    fn open(path: &Path, offset: u64, max_line: usize) -> Result<Generation, PathProblem> {
        let (file, meta) = open_regular(path)?;
        Generation::from_file(file, &meta, offset, max_line)
            .map_err(|e| PathProblem::from_io(path, &e))
    }

    fn from_file(
        mut file: File,
        meta: &Metadata,
        offset: u64,
        max_line: usize,
    ) -> io::Result<Generation> {
        file.seek(SeekFrom::Start(offset))?;
        let fingerprint = Fingerprint::read(&file, FINGERPRINT_BYTES)?;
        Ok(Generation {
            id: FileId::of(meta),
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
    /// What was wrong with the path at the last look (None: following normally).
    problem: Option<PathProblem>,
    /// The generations named by the last checkpoint handed to the sink.
    handed: Vec<FileId>,
}

/// Where to begin when there is no checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At this offset of the file the path names now (from `backscan`).
    At(u64),
    /// At the beginning (`dovegate test`, or a file created after start).
    Beginning,
}

/// What the followed path names now, compared with the current generation.
enum PathNow {
    /// Still the current generation; its length now.
    Same(u64),
    /// Another regular file (or the first one seen).
    Replaced,
    /// Nothing, something unreadable, or something that is not a regular file.
    Problem(PathProblem),
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
            Err(p) => {
                tracing::warn!("{p}");
                f.problem = Some(p);
            }
        }
        f.handed = f.checkpoint().files.iter().map(|p| p.id).collect();
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
            problem: None,
            handed: Vec::new(),
        }
    }

    /// Resumes from a checkpoint: every generation it names is looked for at the path and
    /// among its siblings (a rotated `mail.log.1` keeps its inode), and read on from its
    /// offset. A generation that cannot be found is reported and skipped.
    pub fn resume(path: &Path, max_line: usize, cp: &Checkpoint) -> FileFollower {
        let mut f = FileFollower::empty(path, max_line);
        for pos in &cp.files {
            let found = find_generation(path, pos).or_else(|| find_truncated_copy(path, pos));
            let Some((found, file, meta)) = found else {
                tracing::warn!(
                    path = %path.display(),
                    inode = pos.id.ino,
                    "a checkpointed file generation is gone (rotated away or truncated); lines after offset {} in it are not read",
                    pos.offset
                );
                continue;
            };
            match Generation::from_file(file, &meta, pos.offset, max_line) {
                Ok(g) if found == path => f.current = Some(g),
                Ok(g) => {
                    tracing::info!(path = %found.display(), offset = pos.offset, "reading the rest of a rotated file");
                    f.draining.push(g)
                }
                Err(e) => tracing::warn!(path = %found.display(), error = %e, "cannot reopen"),
            }
        }
        if f.current.is_none() {
            if let Err(p) = open_regular(path) {
                f.problem = Some(p);
            }
        }
        f.handed = f.checkpoint().files.iter().map(|p| p.id).collect();
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was wrong with the followed path at the last look: None while it is followed
    /// normally. For the daemon's rate-limited warning and its "cleared" line; `Display`
    /// says what to do.
    pub fn problem(&self) -> Option<&PathProblem> {
        self.problem.as_ref()
    }

    /// How many files are still read (the current one through its descriptor, and the
    /// rotated ones being drained): while the path is unusable these still deliver logins.
    pub fn open_generations(&self) -> usize {
        self.draining.len() + usize::from(self.current.is_some())
    }

    /// Where the file the path names is read from (None: not open, see `problem`).
    pub fn current(&self) -> Option<FilePos> {
        self.current.as_ref().map(Generation::pos)
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
    /// and the checkpoint that is valid once they are processed. A chunk may be empty when
    /// only the checkpoint changed (a new generation opened): commit it like any other.
    ///
    /// Errors: the path is unreadable, not a regular file (`PathProblem` inside the
    /// `io::Error`, see `PathProblem::of`), or reading failed. A missing path is not an
    /// error (it is waited for) but shows in `problem()`. Lines already available in other
    /// generations are handed out before any error is returned.
    pub fn poll(&mut self, sink: &mut dyn FnMut(&[u8], &Checkpoint)) -> io::Result<()> {
        self.forget_overwritten_drains();
        self.read_draining(sink);
        self.retire_idle_drains();
        let result = match self.look_at_path() {
            PathNow::Same(len) => self
                .handle_truncation(len, sink)
                .and_then(|()| self.read_generation(Slot::Current, sink)),
            PathNow::Replaced => self
                .retire_current(sink)
                .and_then(|()| self.open_current())
                .and_then(|()| self.read_generation(Slot::Current, sink)),
            PathNow::Problem(p) => self.while_path_is_unusable(p, sink),
        };
        self.hand_out_new_generations(sink);
        self.report_long_lines();
        result
    }

    /// A generation opened (or retired) without a line read from it yet still changes the
    /// checkpoint: hand the new one out with an empty chunk, so that it is committed. Else a
    /// crash after a rotation, before the new file's first line, would resume from a
    /// checkpoint that does not know the new file; if that one is rotated away too, its
    /// lines would never be read.
    fn hand_out_new_generations(&mut self, sink: &mut dyn FnMut(&[u8], &Checkpoint)) {
        let cp = self.checkpoint();
        if !cp
            .files
            .iter()
            .map(|f| f.id)
            .eq(self.handed.iter().copied())
        {
            self.handed = cp.files.iter().map(|f| f.id).collect();
            sink(&[], &cp);
        }
    }

    /// A drained generation whose content was replaced (a copy overwritten in place) is no
    /// longer the file we were reading: forget it rather than read foreign lines.
    fn forget_overwritten_drains(&mut self) {
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
    }

    /// Rotated generations first: their lines are older than the current file's. One
    /// that cannot be read (an I/O error) is dropped, loudly: it must not stall the
    /// current file behind it forever.
    fn read_draining(&mut self, sink: &mut dyn FnMut(&[u8], &Checkpoint)) {
        let mut i = 0;
        while i < self.draining.len() {
            match self.read_generation(Slot::Draining(i), sink) {
                Ok(()) => i += 1,
                Err(e) => {
                    let g = self.draining.remove(i);
                    tracing::error!(
                        path = %self.path.display(),
                        inode = g.id.ino,
                        offset = g.reader.offset(),
                        error = %e,
                        "cannot read the rest of a rotated log file; its remaining lines are skipped"
                    );
                }
            }
        }
    }

    /// A writer reopens its log soon after a rotation; once a rotated generation has not
    /// grown for the grace period nobody writes to it any more.
    fn retire_idle_drains(&mut self) {
        let grace = self.drain_grace;
        self.draining.retain(|g| g.last_growth.elapsed() < grace);
    }

    /// Stats the path (never opens it): the same generation, another file, or a problem.
    fn look_at_path(&self) -> PathNow {
        match std::fs::metadata(&self.path) {
            Err(e) => PathNow::Problem(PathProblem::from_io(&self.path, &e)),
            Ok(m) if !m.is_file() => PathNow::Problem(PathProblem::NotRegular {
                path: self.path.clone(),
                kind: problem::kind_of(&m),
            }),
            Ok(m) => match &self.current {
                Some(cur) if cur.id == FileId::of(&m) => PathNow::Same(m.len()),
                _ => PathNow::Replaced,
            },
        }
    }

    /// The path is missing, unreadable or not a file: the current generation (deleted,
    /// renamed away, or hidden by a directory now) is still read through its descriptor,
    /// so that no line written before the change is lost. Missing is waited for quietly;
    /// the others are errors for the caller to report.
    fn while_path_is_unusable(
        &mut self,
        p: PathProblem,
        sink: &mut dyn FnMut(&[u8], &Checkpoint),
    ) -> io::Result<()> {
        let read = self.read_generation(Slot::Current, sink);
        let missing = matches!(p, PathProblem::Missing { .. });
        self.problem = Some(p.clone());
        read?;
        if missing {
            Ok(())
        } else {
            Err(p.into_io())
        }
    }

    /// copytruncate: the same inode got shorter (or was refilled). The lines not read yet
    /// are in the copy, if it is still beside the file uncompressed (`mail.log.1`): drain
    /// them from there, then read the file again from its start.
    fn handle_truncation(
        &mut self,
        len: u64,
        sink: &mut dyn FnMut(&[u8], &Checkpoint),
    ) -> io::Result<()> {
        self.problem = None;
        let Some(cur) = self.current.as_ref() else {
            return Ok(());
        };
        if !cur.truncated(len)? {
            return Ok(());
        }
        let head = cur.fingerprint;
        let copy = self.find_copy_of_current();
        // Rewind first: the checkpoints handed out with the copy's lines must not carry the
        // old offset into the new content.
        if let Some(cur) = self.current.as_mut() {
            cur.rewind()?;
        }
        match copy {
            Some(mut g) => {
                tracing::info!(path = %self.path.display(), "log file was truncated (copytruncate); reading the rest from its copy");
                g.fingerprint = head;
                self.draining.push(g);
                let last = self.draining.len() - 1;
                self.read_generation(Slot::Draining(last), sink)
            }
            None => {
                tracing::warn!(path = %self.path.display(), "log file was truncated (copytruncate) and no copy was found; lines written just before the truncation may be missed");
                Ok(())
            }
        }
    }

    /// A sibling holding the current generation's content up to our offset (same head,
    /// same bytes before the offset), opened at that offset.
    fn find_copy_of_current(&self) -> Option<Generation> {
        let cur = self.current.as_ref()?;
        let (id, offset, head, tail) = (cur.id, cur.reader.offset(), cur.fingerprint, cur.tail);
        // Nothing read yet (an empty head): any sibling would match; reading a foreign file
        // from its start would hand out old lines again.
        if head.len == 0 {
            return None;
        }
        let (file, meta) = find_sibling(
            &self.path,
            |m| FileId::of(m) != id && m.len() >= offset,
            |_, f| {
                head.matches(f).unwrap_or(false) && tail_before(f, offset).is_ok_and(|t| t == tail)
            },
        )
        .map(|(_, f, m)| (f, m))?;
        Generation::from_file(file, &meta, offset, self.max_line).ok()
    }

    /// Rotation (rename or delete, then create): the old generation is read to its end
    /// and kept draining, before the new file is even opened, so that failing to open the
    /// new one (missing for a while, unreadable) never loses the old one's unread tail.
    fn retire_current(&mut self, sink: &mut dyn FnMut(&[u8], &Checkpoint)) -> io::Result<()> {
        let Some(mut old) = self.current.take() else {
            return Ok(());
        };
        tracing::info!(path = %self.path.display(), "log file was rotated; draining the old one");
        old.last_growth = Instant::now();
        self.draining.push(old);
        let last = self.draining.len() - 1;
        self.read_generation(Slot::Draining(last), sink)
    }

    /// Opens the file the path names now, from its start (it is new since the last look).
    fn open_current(&mut self) -> io::Result<()> {
        match Generation::open(&self.path, 0, self.max_line) {
            Ok(g) => {
                self.current = Some(g);
                self.problem = None;
                Ok(())
            }
            Err(p @ PathProblem::Missing { .. }) => {
                // Removed again between stat and open: wait for the next look.
                self.problem = Some(p);
                Ok(())
            }
            Err(p) => {
                self.problem = Some(p.clone());
                Err(p.into_io())
            }
        }
    }

    /// Over-long lines are dropped by the reader; say so once per batch of them.
    fn report_long_lines(&mut self) {
        let dropped = self.dropped_long_lines() - self.reported_long;
        if dropped > 0 {
            tracing::warn!(path = %self.path.display(), count = dropped, "skipped lines longer than the buffer");
            self.reported_long += dropped;
        }
    }

    /// Reads one generation to its end, handing out whole lines with the checkpoint that
    /// holds after them.
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
                Chunk::Partial => {
                    // The head of a line being written already identifies the file (a
                    // copytruncate before the line ends is then recognised).
                    g.last_growth = Instant::now();
                    if g.fingerprint.len < FINGERPRINT_BYTES as u32 {
                        g.fingerprint = Fingerprint::read(&g.file, FINGERPRINT_BYTES)?;
                    }
                }
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
                    self.handed = cp.files.iter().map(|f| f.id).collect();
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

/// A regular file beside `path` (not `path` itself) whose stat satisfies `pre` and whose
/// content satisfies `test`. Only files passing `pre` are opened, without blocking.
fn find_sibling(
    path: &Path,
    pre: impl Fn(&Metadata) -> bool,
    test: impl Fn(&Metadata, &File) -> bool,
) -> Option<(PathBuf, File, Metadata)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rd = std::fs::read_dir(dir).ok()?;
    // Look at a bounded number of siblings: log directories can be large.
    rd.filter_map(Result::ok)
        .take(10_000)
        .map(|e| e.path())
        .filter(|p| p != path)
        .find_map(|p| {
            let (f, m) = open_if(&p, &pre)?;
            test(&m, &f).then_some((p, f, m))
        })
}

/// copytruncate while the daemon was down: the path still names the checkpointed inode, but
/// its content changed; the lines after the checkpoint are in a copy beside it that starts
/// with the same bytes (the checkpoint has no tail fingerprint, so an empty head proves
/// nothing and is not searched for).
fn find_truncated_copy(path: &Path, pos: &FilePos) -> Option<(PathBuf, File, Metadata)> {
    let truncated_in_place = std::fs::metadata(path).is_ok_and(|m| FileId::of(&m) == pos.id);
    if !truncated_in_place || pos.fingerprint.len == 0 {
        return None;
    }
    let found = find_sibling(
        path,
        |m| FileId::of(m) != pos.id && m.len() >= pos.offset,
        |_, f| pos.fingerprint.matches(f).unwrap_or(false),
    )?;
    tracing::info!(path = %path.display(), copy = %found.0.display(), "log file was truncated while dovegate was down (copytruncate); reading the rest from its copy");
    Some(found)
}

/// Finds and opens the file holding a checkpointed generation: the path itself or a
/// sibling (a rotated `mail.log.1` keeps its inode).
fn find_generation(path: &Path, pos: &FilePos) -> Option<(PathBuf, File, Metadata)> {
    let pre = |m: &Metadata| FileId::of(m) == pos.id && m.len() >= pos.offset;
    let test = |_: &Metadata, f: &File| pos.fingerprint.matches(f).unwrap_or(false);
    if let Some((f, m)) = open_if(path, pre) {
        if test(&m, &f) {
            return Some((path.to_path_buf(), f, m));
        }
    }
    find_sibling(path, pre, test)
}

#[cfg(test)]
mod tests;
