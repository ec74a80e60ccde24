//! The agent's state directory: one JSON file per sandbox, enough to adopt
//! it again after a restart (its namespace, how to tell that the namespace
//! is still the same one, and the policy).
//!
//! Each file is written to a temporary name in the same directory, synced,
//! and renamed over the old one (rename(2) is atomic within a file system),
//! so a crash leaves either the old record or the new one, never half of one.

use super::protocol::AgentDefinition;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent keeps its state unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netleash";

/// The subdirectory holding one file per sandbox.
const SANDBOXES: &str = "sandboxes";

/// What the agent records about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub id: String,
    /// The namespace file the sandbox was put with.
    pub netns: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The namespace's identity: st_dev and st_ino of the namespace file
    /// (an nsfs inode, unique while the namespace exists; namespaces(7)).
    pub ns_dev: u64,
    pub ns_inode: u64,
    /// The policy document as it was put, and where it came from.
    pub policy: String,
    pub origin: String,
    /// The agent definition put with it, if any (its MCP servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentDefinition>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the state directory {path}; give a writable one with --state-dir")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the state file {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the state directory {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A state file that could not be read back, and why.
#[derive(Debug)]
pub struct Unreadable {
    pub path: PathBuf,
    pub problem: String,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, mode 0700) `root`/sandboxes.
    pub fn open(root: &Path) -> Result<StateDir, Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = root.join(SANDBOXES);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| Error::Create {
                path: dir.clone(),
                source,
            })?;
        Ok(StateDir { dir })
    }

    /// The file of sandbox `id` (ids are checked to be file names, see
    /// `agent::check_id`).
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `record` atomically: temp file, fsync, rename.
    pub fn save(&self, record: &SandboxRecord) -> Result<(), Error> {
        let path = self.path(&record.id);
        let temporary = self.dir.join(format!(".{}.json.tmp", record.id));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temporary)?;
            let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
            text.push(b'\n');
            file.write_all(&text)?;
            // No fsync: the record must survive the agent (a crash or kill
            // loses nothing written to the page cache), not the host. After
            // a host crash every sandbox namespace is gone too, and a record
            // cut short there is reported as unreadable and left alone. The
            // rename keeps readers from ever seeing half a record.
            fs::rename(&temporary, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temporary);
            Error::Write {
                path: path.clone(),
                source,
            }
        })
    }

    /// Removes the record of `id`; a missing one is not an error.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Remove { path, source }),
        }
    }

    /// Every record, sorted by id, and the files that are not records.
    pub fn load(&self) -> Result<(Vec<SandboxRecord>, Vec<Unreadable>), Error> {
        let entries = fs::read_dir(&self.dir).map_err(|source| Error::List {
            path: self.dir.clone(),
            source,
        })?;
        let (mut records, mut unreadable) = (Vec::new(), Vec::new());
        for entry in entries.flatten() {
            let path = entry.path();
            let is_record = path.extension().is_some_and(|e| e == "json")
                && !entry.file_name().to_string_lossy().starts_with('.');
            if !is_record {
                continue;
            }
            let parsed = fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    serde_json::from_str::<SandboxRecord>(&text).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(record) => records.push(record),
                Err(problem) => unreadable.push(Unreadable { path, problem }),
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((records, unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            netns: "/run/netns/x".into(),
            pid: Some(7),
            ns_dev: 4,
            ns_inode: 4026532000,
            policy: r#"{"type":"unrestricted"}"#.into(),
            origin: "test".into(),
            // "b" carries an agent definition, "a" none.
            agent: (id == "b").then(|| AgentDefinition {
                text: r#"{"mcp_servers": []}"#.into(),
                origin: "annotation netleash.agent".into(),
            }),
        }
    }

    #[test]
    fn records_round_trip_replace_and_go() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path()).unwrap();
        state.save(&record("b")).unwrap();
        state.save(&record("a")).unwrap();
        let mut changed = record("a");
        changed.policy = r#"{"type":"limited"}"#.into();
        state.save(&changed).unwrap();
        std::fs::write(state.path("broken"), "{").unwrap();
        let (records, unreadable) = state.load().unwrap();
        assert_eq!(records, vec![changed, record("b")]);
        assert!(records[1].agent.is_some() && records[0].agent.is_none());
        assert_eq!(unreadable.len(), 1);
        assert!(unreadable[0].path.ends_with("broken.json"));
        state.remove("a").unwrap();
        state.remove("a").unwrap();
        assert_eq!(state.load().unwrap().0, vec![record("b")]);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(root.path().join(SANDBOXES))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
