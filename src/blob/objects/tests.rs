//! Tests of the object store.

use super::*;

fn store() -> (tempfile::TempDir, Durable, BlobStore) {
    let d = tempfile::tempdir().unwrap();
    let sled = sled::Config::new()
        .path(d.path().join("db"))
        .open()
        .unwrap();
    let db = Durable::open(
        sled,
        &d.path().join("db"),
        std::time::Duration::from_secs(10),
        0,
    )
    .unwrap();
    let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
    (d, db, s)
}

#[test]
fn chunk_size_grows_to_fit() {
    assert_eq!(chunk_size_for(10, 1 << 20), 1 << 20);
    assert_eq!(chunk_size_for(64 << 30, 1 << 20), 1 << 20);
    assert_eq!(chunk_size_for(65 << 30, 1 << 20), 2 << 20);
    assert_eq!(chunk_size_for(10, 1), MIN_CHUNK);
}

#[test]
fn add_hashes_copies_and_dedups() {
    let (d, _db, s) = store();
    let src = d.path().join("f.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let a = s.add_file(&src, MIN_CHUNK).unwrap();
    assert!(!a.existing);
    assert_eq!(a.id, sha256(&data));
    assert_eq!(a.manifest.chunks.len(), 4);
    assert_eq!(a.manifest.chunks[3], sha256(&data[3 * 65536..]));
    a.manifest.check().unwrap();
    // The producer rewrites its file: the store's copy is untouched.
    std::fs::write(&src, b"other").unwrap();
    assert_eq!(std::fs::read(s.object_path(&a.id)).unwrap(), data);
    std::fs::write(&src, &data).unwrap();
    let b = s.add_file(&src, MIN_CHUNK).unwrap();
    assert!(b.existing);
    assert_eq!(s.read_chunk(&a.id, 1).unwrap(), &data[65536..131072]);
    assert!(s.read_chunk(&a.id, 4).is_err());
}

#[test]
fn partial_resumes_from_durable_chunks_and_verifies_the_whole() {
    let (d, db, s) = store();
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
    let mut have = s.begin_partial(&id, &m).unwrap();
    assert_eq!(have.count(), 0);
    s.write_chunk(&id, m.offset(0), &data[..65536]).unwrap();
    have.set(0);
    s.checkpoint(&id, &have).unwrap();
    s.write_chunk(&id, m.offset(2), &data[131072..]).unwrap();
    drop(s);
    // Restart: only the checkpointed chunk counts.
    let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
    let mut have = s.begin_partial(&id, &m).unwrap();
    assert!(have.get(0) && !have.get(2));
    assert_eq!(s.read_chunk(&id, 0).unwrap(), &data[..65536]);
    assert!(matches!(s.read_chunk(&id, 2), Err(BlobError::NotHeld(_))));
    for i in 1..3u32 {
        let a = m.offset(i) as usize;
        let b = a + m.chunk_len(i) as usize;
        s.write_chunk(&id, m.offset(i), &data[a..b]).unwrap();
        have.set(i);
    }
    s.checkpoint(&id, &have).unwrap();
    assert!(s.finish_partial(&id, &m, hash_file).unwrap());
    assert!(s.is_complete(&id).unwrap());
    assert_eq!(std::fs::read(s.object_path(&id)).unwrap(), data);
    let out = d.path().join("placed/x.bin");
    s.place(&id, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(s.placed(&out).unwrap(), Some(id));
}

#[test]
fn damage_is_found_never_served_and_demotes_to_partial() {
    let (d, _db, s) = store();
    let src = d.path().join("f.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let a = s.add_file(&src, MIN_CHUNK).unwrap();
    let hashed = |i| {
        s.read_verified_chunk_after(&a.id, i, |len| (vec![0; len], 0))
            .map(|r| r.2)
    };
    // The add hashed what it stored: serving needs no second hash...
    assert!(!hashed(2).unwrap() && !hashed(1).unwrap());
    let obj = s.object_path(&a.id);
    let mut perm = std::fs::metadata(&obj).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&obj, perm).unwrap();
    let f = OpenOptions::new().write(true).open(&obj).unwrap();
    f.write_all_at(&[0xff; 10], 65_536 * 2 + 5).unwrap();
    // ...until the file changes: then every chunk is hashed again.
    assert!(hashed(1).unwrap());
    assert!(matches!(
        s.read_verified_chunk(&a.id, 2),
        Err(BlobError::DamagedChunk { index: 2, .. })
    ));
    assert_eq!(s.scrub(&a.id).unwrap(), vec![2]);
    s.demote(&a.id, &[2]).unwrap();
    assert!(!s.is_complete(&a.id).unwrap());
    let have = s.have(&a.id).unwrap().unwrap();
    assert!(have.get(1) && !have.get(2) && have.count() == a.manifest.chunks.len() - 1);
    assert!(s.partial_path(&a.id).exists() && !obj.exists());
    // Repaired: the good bytes written back, the whole checks out again.
    s.write_chunk(&a.id, 65_536 * 2, &data[65_536 * 2..65_536 * 3])
        .unwrap();
    assert!(s.finish_partial(&a.id, &a.manifest, hash_file).unwrap());
    assert_eq!(std::fs::read(&obj).unwrap(), data);
    assert!(!hashed(2).unwrap(), "a verified finish vouches again");
}

#[test]
fn a_damaged_or_truncated_object_is_never_placed_and_re_adding_repairs_it() {
    let (d, _db, s) = store();
    let src = d.path().join("f.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let a = s.add_file(&src, MIN_CHUNK).unwrap();
    let obj = s.object_path(&a.id);
    let out = d.path().join("placed/m.bin");
    let rot = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = std::fs::read(&obj).unwrap();
        f(&mut b);
        let mut perm = std::fs::metadata(&obj).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(&obj, perm).unwrap();
        std::fs::write(&obj, &b).unwrap();
    };
    // A flipped byte in the last chunk; then a truncation.
    rot(&|b| b[299_000] ^= 0xff);
    assert!(matches!(
        s.place(&a.id, &out),
        Err(BlobError::DamagedChunk { .. })
    ));
    assert!(!out.exists());
    // Adding the original again replaces the damaged object.
    let again = s.add_file(&src, MIN_CHUNK).unwrap();
    assert!(again.existing);
    assert_eq!(std::fs::read(&obj).unwrap(), data);
    s.place(&a.id, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // Bytes appended: found by scrub too (it cuts and refetches the last chunk).
    rot(&|b| b.extend_from_slice(b"tail"));
    assert!(matches!(
        s.place(&a.id, &out),
        Err(BlobError::DamagedChunk { .. })
    ));
    let bad = s.scrub(&a.id).unwrap();
    assert_eq!(bad, vec![a.manifest.chunks.len() as u32 - 1]);
    s.demote(&a.id, &bad).unwrap();
    assert_eq!(
        std::fs::metadata(s.partial_path(&a.id)).unwrap().len(),
        data.len() as u64
    );
    let again = s.add_file(&src, MIN_CHUNK).unwrap();
    assert!(!again.existing, "a demoted copy is not complete");
    rot(&|b| b.truncate(100_000));
    let out2 = d.path().join("placed/m2.bin");
    assert!(matches!(
        s.place(&a.id, &out2),
        Err(BlobError::DamagedChunk { .. })
    ));
    assert!(!out2.exists());
}

#[test]
fn an_interrupted_finish_is_checked_again_and_recorded() {
    let (d, db, s) = store();
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
    let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
    s.begin_partial(&id, &m).unwrap();
    s.write_chunk(&id, 0, &data).unwrap();
    s.checkpoint(&id, &Bitmap::full(m.chunks.len())).unwrap();
    // The crash: moved into place, never recorded complete.
    set_readonly(&s.partial_path(&id));
    std::fs::rename(s.partial_path(&id), s.object_path(&id)).unwrap();
    drop(s);
    let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
    assert!(!s.is_complete(&id).unwrap());
    let have = s.begin_partial(&id, &m).unwrap();
    assert!(have.is_full(), "the moved file holds every chunk");
    assert!(s.finish_partial(&id, &m, hash_file).unwrap());
    assert!(s.is_complete(&id).unwrap());
    assert_eq!(std::fs::read(s.object_path(&id)).unwrap(), data);
}

#[test]
fn a_recorded_bitmap_without_its_file_counts_nothing() {
    let (d, db, s) = store();
    let data = vec![9u8; 150_000];
    let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
    let mut have = s.begin_partial(&id, &m).unwrap();
    s.write_chunk(&id, 0, &data[..65536]).unwrap();
    have.set(0);
    s.checkpoint(&id, &have).unwrap();
    std::fs::remove_file(s.partial_path(&id)).unwrap();
    drop(s);
    let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
    assert_eq!(s.begin_partial(&id, &m).unwrap().count(), 0);
}

/// A failed write of the store's copy is told apart from a failed read
/// of the source (add_reader names the file that failed by it).
#[test]
fn a_failed_copy_is_not_reported_as_a_failed_read() {
    let data = vec![7u8; 200_000];
    let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let e = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, Some(&mut full)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    assert!(e.get_ref().is_some_and(|i| i.is::<OutputFailed>()), "{e:?}");
    let (d, _db, s) = store();
    let src = d.path().join("model.bin");
    // A source that fails to read (a directory) is named as the source.
    let dir = File::open(d.path()).unwrap();
    match s.add_reader(dir, 10, &src, MIN_CHUNK) {
        Err(BlobError::Io { what, path, .. }) => {
            assert_eq!((what, path), ("cannot read", src.display().to_string()))
        }
        other => panic!("{:?}", other.map(|a| a.id)),
    }
}

#[test]
fn arrival_is_announced_once_per_name_and_blob() {
    let (_d, _db, s) = store();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    assert!(s.announce("games/x/1", &a).unwrap());
    assert!(!s.announce("games/x/1", &a).unwrap());
    assert!(s.announce("games/x/2", &a).unwrap());
    assert!(s.announce("games/x/1", &b).unwrap());
}

/// The filesystems of the build directory and the temp directory
/// (O_DIRECT where they have it) and tmpfs where there is one (no
/// O_DIRECT: the buffered fallback).
fn direct_and_buffered_dirs() -> Vec<tempfile::TempDir> {
    let in_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let _ = std::fs::create_dir_all(&in_target);
    let mut dirs = vec![
        tempfile::tempdir_in(&in_target).unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        dirs.push(shm);
    }
    dirs
}

/// A placement copy at the reader's buffer boundaries, between each
/// pair of those filesystems: same bytes, and a new file only.
#[test]
fn a_direct_copy_gives_the_same_bytes_on_any_filesystem() {
    let dirs = direct_and_buffered_dirs();
    for len in [
        0usize,
        1,
        4096,
        4 << 20,
        (4 << 20) + 1,
        (8 << 20) + 4096 + 7,
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 17 % 251) as u8).collect();
        for from in &dirs {
            let src = from.path().join(format!("src-{len}"));
            std::fs::write(&src, &data).unwrap();
            for to in &dirs {
                let dst = to.path().join(format!("dst-{len}"));
                let _ = std::fs::remove_file(&dst);
                copy_direct(&src, &dst).unwrap();
                assert!(std::fs::read(&dst).unwrap() == data, "{len} bytes");
                assert!(copy_direct(&src, &dst).is_err(), "an existing file is kept");
            }
        }
    }
}

/// The whole-file hash at the reader's buffer boundaries, on each of
/// those filesystems.
#[test]
fn whole_file_hash_at_buffer_boundaries() {
    for dir in direct_and_buffered_dirs() {
        for len in [0usize, 1, 4095, 4 << 20, (4 << 20) + 1, (8 << 20) + 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
            let p = dir.path().join("f");
            std::fs::write(&p, &data).unwrap();
            assert_eq!(hash_file(&p).unwrap(), sha256(&data), "{len} bytes");
        }
    }
}

#[test]
fn a_wrong_whole_is_discarded() {
    let (_d, _db, s) = store();
    let data = vec![5u8; 70_000];
    let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
    s.begin_partial(&id, &m).unwrap();
    s.write_chunk(&id, 0, &vec![6u8; 70_000]).unwrap();
    assert!(!s.finish_partial(&id, &m, hash_file).unwrap());
    assert!(!s.is_complete(&id).unwrap());
    assert!(s.have(&id).unwrap().is_none());
}

#[test]
fn names_keep_the_newest_event() {
    let (_d, _db, s) = store();
    let rec = |ts, b: u8| NameRecord {
        blob: [b; 32],
        size: 1,
        root: [0; 32],
        ts_ms: ts,
        event_hash: [b; 32],
        event_id: String::new(),
        event_type: "BLOB_PUBLISHED".into(),
        origin: String::new(),
    };
    assert_eq!(s.set_name("models/a", &rec(10, 1)).unwrap(), Some(None));
    assert_eq!(s.set_name("models/a", &rec(5, 2)).unwrap(), None);
    assert_eq!(
        s.set_name("models/a", &rec(20, 3)).unwrap(),
        Some(Some(rec(10, 1)))
    );
    assert_eq!(s.name("models/a").unwrap().unwrap().blob, [3; 32]);
}

#[test]
fn a_retraction_wins_over_namings_at_or_before_it_in_any_order() {
    let (_d, _db, s) = store();
    let rec = |ts, b: u8| NameRecord {
        blob: [b; 32],
        size: 1,
        root: [0; 32],
        ts_ms: ts,
        event_hash: [b; 32],
        event_id: String::new(),
        event_type: "MODEL_PROMOTED".into(),
        origin: String::new(),
    };
    // Naming, then its retraction: unbound.
    s.set_name("models/a", &rec(10, 1)).unwrap();
    assert_eq!(
        s.forget("models/a", Retraction::up_to(10)).unwrap(),
        Some(rec(10, 1))
    );
    assert_eq!(s.name("models/a").unwrap(), None);
    // Retraction first (catch-up order), then an older naming: stays unbound.
    assert_eq!(s.forget("models/b", Retraction::up_to(30)).unwrap(), None);
    assert_eq!(s.set_name("models/b", &rec(30, 2)).unwrap(), None);
    assert_eq!(s.set_name("models/b", &rec(29, 2)).unwrap(), None);
    assert_eq!(s.name("models/b").unwrap(), None);
    // A later naming binds again; a stale retraction does not unbind it,
    // nor move the retraction back.
    assert_eq!(s.set_name("models/b", &rec(31, 3)).unwrap(), Some(None));
    assert_eq!(s.forget("models/b", Retraction::up_to(20)).unwrap(), None);
    assert_eq!(s.name("models/b").unwrap().unwrap().blob, [3; 32]);
    assert_eq!(
        s.forgotten("models/b").unwrap(),
        Some(Retraction::up_to(30))
    );
    assert_eq!(s.set_name("models/b", &rec(25, 4)).unwrap(), None);
    let mut f: Vec<_> = s
        .forgotten_names()
        .unwrap()
        .into_iter()
        .map(|(n, r)| (n, r.at_ms))
        .collect();
    f.sort();
    assert_eq!(
        f,
        [("models/a".to_string(), 10), ("models/b".to_string(), 30)]
    );
}

fn naming(ts: u64, h: u8) -> NameRecord {
    NameRecord {
        blob: [h; 32],
        size: 1,
        root: [0; 32],
        ts_ms: ts,
        event_hash: [h; 32],
        event_id: String::new(),
        event_type: "MODEL_PROMOTED".into(),
        origin: String::new(),
    }
}

#[test]
fn a_retraction_covers_its_naming_and_older_ones_not_newer_ones() {
    let (_d, _db, s) = store();
    // The binding retracted: time 10, hash 5.
    let r = Retraction {
        at_ms: 10,
        naming_hash: [5; 32],
    };
    s.set_name("models/a", &naming(10, 5)).unwrap();
    assert_eq!(s.forget("models/a", r).unwrap(), Some(naming(10, 5)));
    // Older (time, then hash at the same time): retracted.
    for (ts, h) in [(10, 5), (10, 4), (9, 9)] {
        assert_eq!(s.set_name("models/a", &naming(ts, h)).unwrap(), None);
    }
    // Newer, even within the same millisecond: bound.
    assert_eq!(s.set_name("models/a", &naming(10, 6)).unwrap(), Some(None));
    assert_eq!(
        s.set_name("models/a", &naming(11, 0)).unwrap(),
        Some(Some(naming(10, 6)))
    );
    // A naming newer than the retracted one that was bound first stays.
    s.set_name("models/b", &naming(20, 7)).unwrap();
    let older = Retraction {
        at_ms: 20,
        naming_hash: [6; 32],
    };
    assert_eq!(s.forget("models/b", older).unwrap(), None);
    assert_eq!(s.name("models/b").unwrap(), Some(naming(20, 7)));
    // A retraction stored as time alone (before the hash was kept)
    // covers the whole millisecond.
    s.forgotten
        .insert("models/c", &30u64.to_be_bytes()[..])
        .unwrap();
    assert_eq!(
        s.forgotten("models/c").unwrap(),
        Some(Retraction::up_to(30))
    );
    assert_eq!(s.set_name("models/c", &naming(30, 0xfe)).unwrap(), None);
    assert_eq!(s.set_name("models/c", &naming(31, 0)).unwrap(), Some(None));
}

#[test]
fn a_retraction_reaches_no_further_than_its_own_time_plus_the_skew() {
    use crate::blob::names::retraction_of;
    use crate::blob::{Forgetting, FORGET_MAX_AHEAD_MS};
    let (_d, _db, s) = store();
    let t = 1_767_772_800_000u64;
    let f = |forgotten_ms, naming_hash: Option<[u8; 32]>| Forgetting {
        name: "models/a".into(),
        forgotten_ms,
        blob: None,
        naming_hash: naming_hash.map(|h| hex_id(&h)),
    };
    // Within the bound: as published.
    assert_eq!(
        retraction_of(&f(t - 5, Some([3; 32])), t),
        Retraction {
            at_ms: t - 5,
            naming_hash: [3; 32]
        }
    );
    assert_eq!(retraction_of(&f(t, None), t), Retraction::up_to(t));
    // Far ahead of the retraction's own time (a hand-made u64::MAX): cut
    // to that time plus the skew, so later namings bind again.
    let bound = t + FORGET_MAX_AHEAD_MS;
    for h in [None, Some([3; 32])] {
        assert_eq!(retraction_of(&f(u64::MAX, h), t), Retraction::up_to(bound));
    }
    s.set_name("models/a", &naming(bound, 1)).unwrap();
    let r = retraction_of(&f(u64::MAX, None), t);
    assert_eq!(s.forget("models/a", r).unwrap(), Some(naming(bound, 1)));
    assert_eq!(s.set_name("models/a", &naming(bound, 2)).unwrap(), None);
    assert_eq!(
        s.set_name("models/a", &naming(bound + 1, 0)).unwrap(),
        Some(None)
    );
}

#[test]
fn retractions_older_than_a_time_are_pruned() {
    let (_d, _db, s) = store();
    s.forget("models/old", Retraction::up_to(100)).unwrap();
    s.forget("models/new", Retraction::up_to(200)).unwrap();
    assert_eq!(s.prune_forgotten(200).unwrap(), 1);
    assert_eq!(s.forgotten("models/old").unwrap(), None);
    assert_eq!(
        s.forgotten("models/new").unwrap(),
        Some(Retraction::up_to(200))
    );
    assert_eq!(s.prune_forgotten(200).unwrap(), 0);
}

#[test]
fn bitmaps() {
    let mut b = Bitmap::new(10);
    b.set(0);
    b.set(9);
    b.set(10);
    assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(10));
    assert_eq!(b.count(), 2);
    assert!(Bitmap::full(10).is_full());
    assert!(b.fits(10) && !b.fits(11));
}
