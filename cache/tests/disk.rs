//! The disk tier under real conditions: real files in a temp dir, real threads racing, files
//! corrupted and aged by hand. Each test reads as a few lines over the `Cache` helpers below.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime};

use ferry_cache::{
    CacheKey, DiskConfig, DiskStore, Entry, EntryError, EntryKind, Error, EvictReport, KeyBuilder, PutOutcome, Store,
    Usage,
};

#[test]
fn put_then_get_round_trips() {
    let cache = Cache::new();
    for e in [entry(1, 1000), entry(2, 4 << 20), compressible(3, 4 << 20)] {
        assert_eq!(cache.put(&e), PutOutcome::Published { bytes: e.encode().len() as u64 });
        assert_eq!(cache.get(&e.key), Some(e.clone()));
        let mode = fs::metadata(cache.path(&e.key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "entries are read-only, mode {mode:o}");
    }
    assert_eq!(cache.get(&entry(4, 10).key), None);
    assert!(cache.temp_files().is_empty());
}

#[test]
fn second_put_of_a_key_changes_nothing() {
    let cache = Cache::new();
    let first = entry(1, 1000);
    cache.put(&first);
    let path = cache.path(&first.key);
    let (ino, bytes) = (fs::metadata(&path).unwrap().ino(), fs::read(&path).unwrap());
    let second = Entry { payload: b"different".to_vec(), ..first.clone() };
    assert_eq!(cache.put(&second), PutOutcome::AlreadyPresent);
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_eq!(cache.get(&first.key), Some(first));
}

#[test]
fn concurrent_puts_of_one_key_have_exactly_one_winner() {
    let cache = Cache::new();
    let key = entry(0, 1).key;
    let barrier = Barrier::new(16);
    let outcomes: Vec<(Entry, PutOutcome)> = thread::scope(|s| {
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (cache, barrier) = (&cache, &barrier);
                s.spawn(move || {
                    let store = cache.reopen(DiskConfig::default()); // as another process would
                    let mine = Entry { key, ..entry(100 + i, 200_000) };
                    barrier.wait();
                    let outcome = store.put(&mine).unwrap();
                    (mine, outcome)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let winners: Vec<&Entry> =
        outcomes.iter().filter(|(_, o)| matches!(o, PutOutcome::Published { .. })).map(|(e, _)| e).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|(e, o)| *o == PutOutcome::AlreadyPresent || e == winners[0]));
    for _ in 0..3 {
        assert_eq!(cache.get(&key).as_ref(), Some(winners[0]));
    }
    assert!(cache.temp_files().is_empty());
}

#[test]
fn corrupt_entries_are_removed_and_replaced() {
    let other = entry(99, 500);
    type Corrupt = fn(&mut Vec<u8>);
    let corruptions: [(&str, Corrupt); 5] = [
        ("flipped byte", |b| b[300] ^= 0x10),
        ("truncated", |b| b.truncate(b.len() / 2)),
        ("zero length", |b| b.clear()),
        ("one byte short", |b| {
            b.pop();
        }),
        ("another key's entry", |b| *b = entry(99, 500).encode()),
    ];
    for (what, corrupt) in corruptions {
        let cache = Cache::new();
        let e = entry(1, 1000);
        cache.put(&e);
        let path = cache.path(&e.key);
        let mut bytes = fs::read(&path).unwrap();
        corrupt(&mut bytes);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, bytes).unwrap();

        match cache.store.get(&e.key) {
            Err(Error::Corrupt { path: reported, reason }) => {
                assert_eq!(reported, path, "{what}");
                if what == "another key's entry" {
                    assert_eq!(reason, EntryError::KeyMismatch { expected: e.key, found: other.key });
                }
            }
            other => panic!("{what}: expected corrupt, got {other:?}"),
        }
        assert!(!path.exists(), "{what}: the corrupt file is gone");
        assert_eq!(cache.get(&e.key), None, "{what}");
        assert_eq!(cache.put(&e), PutOutcome::Published { bytes: e.encode().len() as u64 });
        assert_eq!(cache.get(&e.key), Some(e), "{what}");
    }
}

#[test]
fn readers_racing_eviction_see_whole_entries_or_misses() {
    let cache = Cache::new();
    let entries: Vec<Entry> = (0..16).map(|i| entry(i, 2000)).collect();
    let size = entries[0].encode().len() as u64;
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let store = cache.reopen(DiskConfig { max_bytes: 4 * size, grace: Duration::ZERO });
            for _ in 0..200 {
                for e in &entries {
                    store.put(e).unwrap();
                }
                store.evict().unwrap();
            }
            done.store(true, Ordering::Release);
        });
        s.spawn(|| {
            let store = cache.reopen(DiskConfig::default());
            let (mut hits, mut misses) = (0, 0);
            while !done.load(Ordering::Acquire) {
                for e in &entries {
                    match store.get(&e.key) {
                        Ok(Some(got)) => {
                            assert!(got == *e, "a hit returned the wrong entry: {got:?}");
                            hits += 1;
                        }
                        Ok(None) => misses += 1,
                        Err(err) => panic!("a reader racing eviction got an error: {err:?}"),
                    }
                }
            }
            assert!(hits > 0 && misses > 0, "the race happened: {hits} hits, {misses} misses");
        });
    });
}

#[test]
fn eviction_removes_least_recently_used_first() {
    let cache = Cache::new();
    let entries: Vec<Entry> = (0..10).map(|i| entry(i, 1000)).collect();
    let size = entries[0].encode().len() as u64;
    for (i, e) in entries.iter().enumerate() {
        cache.put(e);
        cache.set_age(&e.key, hours(10 - i as u64)); // entry 0 is the least recently used
    }
    let small = cache.reopen(DiskConfig { max_bytes: 5 * size, grace: minutes(10) });
    assert_eq!(
        small.evict().unwrap(),
        EvictReport {
            removed_entries: 6,
            removed_bytes: 6 * size,
            kept_entries: 4,
            kept_bytes: 4 * size,
            removed_temp_files: 0,
        }
    );
    assert_eq!(cache.present(&entries), [false, false, false, false, false, false, true, true, true, true]);
    assert_eq!(small.usage().unwrap(), Usage { entries: 4, bytes: 4 * size });
}

#[test]
fn eviction_spares_entries_within_the_grace_period() {
    let cache = Cache::new();
    let entries: Vec<Entry> = (0..10).map(|i| entry(i, 1000)).collect();
    let size = entries[0].encode().len() as u64;
    for (i, e) in entries.iter().enumerate() {
        cache.put(e);
        if i < 7 {
            cache.set_age(&e.key, hours(10 - i as u64));
        }
    }
    let small = cache.reopen(DiskConfig { max_bytes: 2 * size, grace: minutes(10) });
    let report = small.evict().unwrap();
    assert_eq!((report.removed_entries, report.kept_bytes), (7, 3 * size));
    assert_eq!(cache.present(&entries)[6..], [false, true, true, true]);
}

#[test]
fn a_hit_makes_an_entry_recently_used() {
    let cache = Cache::new();
    let entries: Vec<Entry> = (0..6).map(|i| entry(i, 1000)).collect();
    let size = entries[0].encode().len() as u64;
    for (i, e) in entries.iter().enumerate() {
        cache.put(e);
        cache.set_age(&e.key, hours(6 - i as u64));
    }
    assert!(cache.get(&entries[0].key).is_some());
    let small = cache.reopen(DiskConfig { max_bytes: 3 * size + size / 2, grace: Duration::ZERO });
    assert_eq!(small.evict().unwrap().removed_entries, 3);
    assert_eq!(cache.present(&entries), [true, false, false, false, true, true]);
}

#[test]
fn put_evicts_when_the_cache_grows_over_its_limit() {
    let cache = Cache::new();
    let size = entry(0, 1000).encode().len() as u64;
    let small = cache.reopen(DiskConfig { max_bytes: 5 * size, grace: Duration::ZERO });
    for i in 0..30 {
        small.put(&entry(i, 1000)).unwrap();
    }
    let usage = small.usage().unwrap();
    assert!(usage.bytes <= 5 * size && usage.entries >= 1, "{usage:?}");
}

#[test]
fn eviction_removes_stale_temp_files_only() {
    let cache = Cache::new();
    let tmp = cache.store.root().join("tmp");
    let (stale, fresh) = (tmp.join("1.0.0.tmp"), tmp.join("2.0.0.tmp"));
    fs::write(&stale, b"half an entry").unwrap();
    fs::write(&fresh, b"being written").unwrap();
    File::open(&stale).unwrap().set_modified(SystemTime::now() - minutes(61)).unwrap();
    assert_eq!(cache.store.evict().unwrap().removed_temp_files, 1);
    assert_eq!(cache.temp_files(), [fresh]);
}

#[test]
fn unwritable_roots_are_io_errors_that_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    fs::write(&file, b"").unwrap();
    match DiskStore::open(file.join("sub"), DiskConfig::default()) {
        Err(Error::Io { path, .. }) => assert!(path.starts_with(&file), "{path:?}"),
        other => panic!("expected an i/o error, got {other:?}"),
    }

    // No room for the temp file (as with a full disk): nothing is published.
    let e = entry(1, 1000);
    let cache = Cache::new();
    let tmp = cache.store.root().join("tmp");
    fs::remove_dir(&tmp).unwrap();
    fs::write(&tmp, b"").unwrap();
    assert!(matches!(cache.store.put(&e), Err(Error::Io { path, .. }) if path.starts_with(&tmp)));
    assert!(!cache.path(&e.key).exists());

    // The temp file is written but cannot be published: it is cleaned up.
    let cache = Cache::new();
    let entries = cache.store.root().join("entries");
    fs::remove_dir(&entries).unwrap();
    fs::write(&entries, b"").unwrap();
    assert!(matches!(cache.store.put(&e), Err(Error::Io { .. })));
    assert!(cache.temp_files().is_empty());
}

/// A store in a fresh temp dir, with helpers that unwrap.
struct Cache {
    /// Owns the directory, deleted on drop.
    _dir: tempfile::TempDir,
    store: DiskStore,
}

impl Cache {
    fn new() -> Cache {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("cache"), DiskConfig::default()).unwrap();
        Cache { _dir: dir, store }
    }

    /// A second handle on the same directory, like another process with its own config.
    fn reopen(&self, config: DiskConfig) -> DiskStore {
        DiskStore::open(self.store.root(), config).unwrap()
    }

    fn put(&self, e: &Entry) -> PutOutcome {
        self.store.put(e).unwrap()
    }

    fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.store.get(key).unwrap()
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        let hex = key.to_string();
        let path = self.store.root().join("entries").join(&hex[..2]).join(&hex);
        assert_eq!(path, self.store.entry_path(key));
        path
    }

    /// Makes an entry look last used `age` ago.
    fn set_age(&self, key: &CacheKey, age: Duration) {
        let file = File::open(self.path(key)).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    fn present(&self, entries: &[Entry]) -> Vec<bool> {
        entries.iter().map(|e| self.path(&e.key).exists()).collect()
    }

    fn temp_files(&self) -> Vec<PathBuf> {
        let dir = self.store.root().join("tmp");
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
    }
}

/// An entry with `len` incompressible payload bytes and a key derived from `seed`.
fn entry(seed: u64, len: usize) -> Entry {
    let mut payload = vec![0; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut payload);
    Entry { kind: EntryKind::Result, key: key(seed), toolchain: [7; 32], payload }
}

fn compressible(seed: u64, len: usize) -> Entry {
    let payload = format!("seed {seed}: the same line again\n").into_bytes();
    Entry { payload: payload.iter().copied().cycle().take(len).collect(), ..entry(seed, 0) }
}

fn key(seed: u64) -> CacheKey {
    KeyBuilder::new("test").field("seed", seed.to_le_bytes()).finish()
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
