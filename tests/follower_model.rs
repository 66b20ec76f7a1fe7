//! Model-based test of the file follower (after vector's file-source tests): random
//! sequences of writes, partial writes, rotations of every kind, clean restarts and
//! kill -9 restarts run against real files in a temporary directory, driving
//! `FileFollower` directly. The model records every line written and every line handed
//! out, and checks:
//! - every line written is delivered; exactly once when there was no kill -9;
//! - a line handed out after the committed checkpoint and lost with a kill -9 (the engine
//!   never committed it) is delivered again after the restart;
//! - a line is delivered twice only after a kill -9 that resumed from a committed
//!   checkpoint older than the line's delivery;
//! - no partial line is ever delivered (each chunk is whole lines, each line intact);
//! - every checkpoint offset is at a line start.
//!
//! The generator respects the follower's documented inherent limits (see `tailer`):
//! - between two rotations (and between a restart and a rotation: the daemon polls as soon
//!   as it starts) the follower polls at least once: a
//!   generation rotated away twice, deleted, or truncated and refilled before it was ever
//!   read cannot be found by anyone (real rotations are hours apart);
//! - before a copytruncate, the follower has read from the file since content was first
//!   written into it: a file truncated before any of its bytes were read looks the same as
//!   a file nothing was written to, and its copy cannot be told from any other sibling;
//! - after a delete + recreate, a copytruncate while the committed checkpoint names no
//!   byte of the file, or a second rotation, since the last commit, a commit
//!   follows a poll before a kill -9: a generation deleted while the daemon is down, or
//!   created after the committed checkpoint and rotated away before the crash, is unknown
//!   to the restarted follower (its checkpoint does not name it, or it is gone);
//! - a line being written is finished before a rotation (syslog writes whole lines; a
//!   copytruncate in the middle of a line splits it between two files);
//! - rotated files stay in the directory uncompressed (a compressed copy is unreadable);
//! - a deleted file's inode number is not reused during a case (the model keeps the deleted
//!   files open): a checkpointed generation that held no byte yet has nothing but its
//!   inode to be recognised by, so a later file reusing that inode is taken for it.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use dovegate::source::tailer::{FileFollower, Start};
use dovegate::state::Checkpoint;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Action {
    /// Whole lines.
    Write(u8),
    /// The first part of a line, no newline yet.
    Partial,
    /// The rest of the line begun by `Partial`.
    Finish,
    /// rename, `late` lines into the renamed file (the writer has not reopened yet), create.
    RenameCreate {
        late: u8,
    },
    /// copy to a sibling, truncate in place.
    CopyTruncate,
    /// unlink, `late` lines into the deleted file, create.
    DeleteRecreate {
        late: u8,
    },
    Poll,
    /// The engine committed everything handed out: the last checkpoint becomes durable.
    Commit,
    /// Clean stop and start: resume from the follower's own last checkpoint.
    Restart,
    /// kill -9 and start: resume from the last committed checkpoint.
    Kill9,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (1u8..6).prop_map(Action::Write),
        2 => Just(Action::Partial),
        2 => Just(Action::Finish),
        1 => (0u8..3).prop_map(|late| Action::RenameCreate { late }),
        1 => Just(Action::CopyTruncate),
        1 => (0u8..3).prop_map(|late| Action::DeleteRecreate { late }),
        5 => Just(Action::Poll),
        2 => Just(Action::Commit),
        1 => Just(Action::Restart),
        1 => Just(Action::Kill9),
    ]
}

/// Line `id`: the id first (so that every file's first bytes differ, as timestamps make
/// them differ in real logs), then filler of varying length (some lines are shorter than a
/// fingerprint, some longer).
fn line(id: u64) -> String {
    let filler = "x".repeat((id * 37 % 150) as usize);
    format!("L{id:08} user=<u{id}> {filler}\n")
}

fn parse_id(l: &str) -> Option<u64> {
    l.get(1..9)?.parse().ok()
}

struct World {
    _dir: tempfile::TempDir,
    log: PathBuf,
    /// The writer's descriptor (O_APPEND, as syslog daemons open logs).
    writer: File,
    next_id: u64,
    /// A line begun and not finished: its id.
    partial: Option<u64>,
    rotations: u32,
    written: Vec<u64>,
    follower: Option<FileFollower>,
    delivered: HashMap<u64, u32>,
    /// Lines handed out since the last commit.
    since_commit: Vec<u64>,
    /// Lines that may be delivered again (handed out after the committed checkpoint when a
    /// kill -9 happened).
    may_repeat: HashSet<u64>,
    last_cp: Checkpoint,
    committed: Checkpoint,
    /// A rotation happened and the follower has not polled since.
    unpolled_rotation: bool,
    /// A delete + recreate happened and no commit since.
    uncommitted_destruction: bool,
    /// Rotations since the last commit.
    rotations_since_commit: u32,
    /// Content was written into the current generation and the follower has not polled
    /// since it began.
    unread_generation: bool,
    /// The follower has polled while the current generation had content.
    gen_read: bool,
    kills: u32,
    /// Deleted files, kept open so that their inode numbers are not reused.
    graveyard: Vec<File>,
    /// The delivery count each line must reach: one more than it had at a kill -9 that
    /// lost it.
    owed: HashMap<u64, u32>,
}

fn open_append(p: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap()
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("mail.log");
        let writer = open_append(&log);
        let follower = FileFollower::new(&log, 4096, Start::Beginning);
        // The daemon commits where a first start begins before any line arrives.
        let cp = follower.checkpoint();
        World {
            _dir: dir,
            log,
            writer,
            next_id: 0,
            partial: None,
            rotations: 0,
            written: Vec::new(),
            follower: Some(follower),
            delivered: HashMap::new(),
            since_commit: Vec::new(),
            may_repeat: HashSet::new(),
            last_cp: cp.clone(),
            committed: cp,
            unpolled_rotation: false,
            uncommitted_destruction: false,
            rotations_since_commit: 0,
            unread_generation: false,
            gen_read: false,
            kills: 0,
            graveyard: Vec::new(),
            owed: HashMap::new(),
        }
    }

    fn write_lines(&mut self, n: u8) {
        self.finish();
        for _ in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            self.writer.write_all(line(id).as_bytes()).unwrap();
            self.written.push(id);
            self.note_write();
        }
    }

    /// A write into the file the path names: a generation that has content now.
    fn note_write(&mut self) {
        let ours = std::fs::metadata(&self.log)
            .is_ok_and(|m| m.ino() == self.writer.metadata().unwrap().ino());
        if ours && !self.gen_read {
            self.unread_generation = true;
        }
    }

    fn begin_partial(&mut self) {
        if self.partial.is_some() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let l = line(id);
        self.writer.write_all(&l.as_bytes()[..l.len() / 2]).unwrap();
        self.partial = Some(id);
        self.note_write();
    }

    fn finish(&mut self) {
        if let Some(id) = self.partial.take() {
            let l = line(id);
            self.writer.write_all(&l.as_bytes()[l.len() / 2..]).unwrap();
            self.written.push(id);
        }
    }

    fn rotated_name(&mut self) -> PathBuf {
        self.rotations += 1;
        self.log.with_extension(format!("log.{}", self.rotations))
    }

    /// Before a rotation or a restart: whole lines only, and at least one poll since the
    /// last rotation (see the module comment).
    fn before_rotation_or_restart(&mut self) {
        self.finish();
        if self.unpolled_rotation {
            self.poll();
        }
    }

    fn rotate(&mut self, a: &Action) {
        self.before_rotation_or_restart();
        if matches!(a, Action::CopyTruncate) && self.unread_generation {
            self.poll();
        }
        match *a {
            Action::RenameCreate { late } => {
                let to = self.rotated_name();
                std::fs::rename(&self.log, to).unwrap();
                self.write_lines(late);
                self.writer = open_append(&self.log);
            }
            Action::CopyTruncate => {
                let to = self.rotated_name();
                std::fs::copy(&self.log, to).unwrap();
                self.writer.set_len(0).unwrap();
                // A copy is recognised by the first bytes the committed checkpoint names.
                if self
                    .committed
                    .files
                    .last()
                    .is_none_or(|p| p.fingerprint.len == 0)
                {
                    self.uncommitted_destruction = true;
                }
            }
            Action::DeleteRecreate { late } => {
                std::fs::remove_file(&self.log).unwrap();
                self.write_lines(late);
                let old = std::mem::replace(&mut self.writer, open_append(&self.log));
                self.graveyard.push(old);
                self.uncommitted_destruction = true;
            }
            _ => unreachable!(),
        }
        self.unpolled_rotation = true;
        self.rotations_since_commit += 1;
        self.gen_read = false;
        self.unread_generation = false;
    }

    fn poll(&mut self) {
        let follower = self.follower.as_mut().unwrap();
        let mut got: Vec<(String, Checkpoint)> = Vec::new();
        follower
            .poll(&mut |chunk, cp| {
                got.push((String::from_utf8(chunk.to_vec()).unwrap(), cp.clone()));
            })
            .unwrap();
        for (chunk, cp) in got {
            // Empty: only the checkpoint changed (a new generation opened).
            assert!(
                chunk.is_empty() || chunk.ends_with('\n'),
                "a chunk ends inside a line: {chunk:?}"
            );
            for l in chunk.lines() {
                let id = parse_id(l).unwrap_or_else(|| panic!("not a line written: {l:?}"));
                assert_eq!(format!("{l}\n"), line(id), "a partial or mixed line");
                *self.delivered.entry(id).or_default() += 1;
                self.since_commit.push(id);
            }
            self.check_line_starts(&cp);
            self.last_cp = cp;
        }
        self.unpolled_rotation = false;
        if self.unread_generation {
            self.gen_read = true;
            self.unread_generation = false;
        }
    }

    /// Every offset of `cp` is 0 or just after a newline of its generation (found by inode
    /// in the directory; a deleted one cannot be checked).
    fn check_line_starts(&self, cp: &Checkpoint) {
        let files: Vec<(File, u64)> = std::fs::read_dir(self.log.parent().unwrap())
            .unwrap()
            .filter_map(|e| {
                let f = File::open(e.ok()?.path()).ok()?;
                let ino = f.metadata().ok()?.ino();
                Some((f, ino))
            })
            .collect();
        for pos in &cp.files {
            if pos.offset == 0 {
                continue;
            }
            if let Some((f, _)) = files.iter().find(|(_, ino)| *ino == pos.id.ino) {
                let mut b = [0u8];
                if f.read_exact_at(&mut b, pos.offset - 1).is_ok() {
                    assert_eq!(b[0], b'\n', "offset {} is not at a line start", pos.offset);
                }
            }
        }
    }

    fn commit(&mut self) {
        self.committed = self.last_cp.clone();
        self.since_commit.clear();
        // The checkpoint committed reflects the rotations polled so far (at most one is not).
        self.rotations_since_commit = u32::from(self.unpolled_rotation);
        if !self.unpolled_rotation {
            self.uncommitted_destruction = false;
        }
    }

    fn restart(&mut self) {
        self.before_rotation_or_restart();
        let cp = self.follower.take().unwrap().checkpoint();
        let f = FileFollower::resume(&self.log, 4096, &cp);
        self.last_cp = f.checkpoint();
        self.follower = Some(f);
        self.unpolled_rotation = true;
    }

    fn kill9(&mut self) {
        self.before_rotation_or_restart();
        if self.uncommitted_destruction || self.rotations_since_commit >= 2 {
            self.poll();
            self.commit();
        }
        drop(self.follower.take());
        self.kills += 1;
        for id in &self.since_commit {
            self.owed.insert(*id, self.delivered[id] + 1);
        }
        self.may_repeat.extend(self.since_commit.drain(..));
        let f = FileFollower::resume(&self.log, 4096, &self.committed);
        self.last_cp = f.checkpoint();
        self.follower = Some(f);
        self.unpolled_rotation = true;
    }

    fn apply(&mut self, a: &Action) {
        match a {
            Action::Write(n) => self.write_lines(*n),
            Action::Partial => self.begin_partial(),
            Action::Finish => self.finish(),
            Action::RenameCreate { .. } | Action::CopyTruncate | Action::DeleteRecreate { .. } => {
                self.rotate(a)
            }
            Action::Poll => self.poll(),
            Action::Commit => self.commit(),
            Action::Restart => self.restart(),
            Action::Kill9 => self.kill9(),
        }
    }

    /// Finish the line being written, read everything, and check the delivery counts.
    fn check_end(&mut self) {
        self.finish();
        self.poll();
        for id in &self.written {
            let n = self.delivered.get(id).copied().unwrap_or(0);
            assert!(n >= 1, "line {id} was never delivered");
            let owed = self.owed.get(id).copied().unwrap_or(1);
            assert!(
                n >= owed,
                "line {id} lost by a kill -9 was not delivered again"
            );
            if n > 1 {
                assert!(
                    self.may_repeat.contains(id),
                    "line {id} delivered {n} times, not after a kill -9"
                );
                assert!(n <= 1 + self.kills, "line {id} delivered {n} times");
            }
        }
        let written: HashSet<u64> = self.written.iter().copied().collect();
        for id in self.delivered.keys() {
            assert!(
                written.contains(id),
                "line {id} delivered but never written"
            );
        }
    }
}

proptest! {
    // Moderate: each case runs real file operations; debug build under 20 s.
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_line_is_delivered_once(actions in prop::collection::vec(action(), 1..60)) {
        let mut w = World::new();
        for a in &actions {
            w.apply(a);
        }
        w.check_end();
    }
}

/// The scenarios most likely to break, spelled out (they also run when proptest is
/// told to run fewer cases).
#[test]
fn fixed_sequences() {
    use Action::*;
    let cases: Vec<Vec<Action>> = vec![
        vec![Write(3), Poll, Partial, Poll, Finish, Poll],
        vec![Write(2), Poll, RenameCreate { late: 2 }, Write(2), Poll],
        vec![Write(2), Poll, Write(1), CopyTruncate, Write(2), Poll],
        vec![
            Write(2),
            Poll,
            Write(1),
            DeleteRecreate { late: 1 },
            Write(1),
        ],
        vec![Write(2), Poll, Commit, Write(2), Poll, Kill9, Write(1)],
        vec![
            Write(2),
            Poll,
            Commit,
            RenameCreate { late: 1 },
            Write(2),
            Kill9,
        ],
        vec![Write(2), Partial, Restart, Finish, Write(1), Poll],
        // copytruncate after the committed checkpoint: the copy is found on resume.
        vec![
            Write(2),
            Poll,
            Commit,
            Write(1),
            Poll,
            CopyTruncate,
            Write(1),
            Kill9,
        ],
        vec![
            Write(1),
            Poll,
            RenameCreate { late: 0 },
            Poll,
            RenameCreate { late: 1 },
            Restart,
            Write(1),
        ],
    ];
    for c in cases {
        eprintln!("case {c:?}");
        let mut w = World::new();
        for a in &c {
            w.apply(a);
        }
        w.check_end();
    }
}
